"""The seed tutorial's code, verbatim: the baseline Herald is measured against.

Run exactly as the tutorial says (without --reload): ``uvicorn tutorial_main:app``
(uvicorn's defaults: the websockets-sansio protocol, httptools, uvloop).
"""

from typing import List  # noqa: UP035 - the tutorial's code, unchanged

from fastapi import FastAPI, WebSocket

app = FastAPI()


@app.websocket("/ws")
async def websocket_endpoint(websocket: WebSocket):
    await websocket.accept()
    while True:
        data = await websocket.receive_text()
        await websocket.send_text(f"Message text was: {data}")


connected_clients: List[WebSocket] = []  # noqa: UP006


@app.websocket("/ws_broadcast")
async def websocket_broadcast_endpoint(websocket: WebSocket):
    await websocket.accept()
    connected_clients.append(websocket)
    try:
        while True:
            data = await websocket.receive_text()
            for client in connected_clients:
                if client != websocket:
                    await client.send_text(f"New message: {data}")
    except Exception as e:  # noqa: F841
        connected_clients.remove(websocket)
        await websocket.close()
