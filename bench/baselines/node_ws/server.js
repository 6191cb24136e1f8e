// The tutorial's /ws (echo) and /ws_broadcast on Node's `ws` 8 (+ bufferutil):
// the baseline a JavaScript team would write.  Usage: node server.js PORT
'use strict';
const http = require('http');
const { WebSocketServer, WebSocket } = require('ws');

const port = Number(process.argv[2] || 8000);
const server = http.createServer((req, res) => { res.writeHead(404); res.end(); });
const echo = new WebSocketServer({ noServer: true });
const broadcast = new WebSocketServer({ noServer: true });

echo.on('connection', (ws) => {
  ws.on('message', (data) => ws.send(`Message text was: ${data}`));
});

broadcast.on('connection', (ws) => {
  ws.on('message', (data) => {
    const text = `New message: ${data}`;
    for (const client of broadcast.clients) {
      if (client !== ws && client.readyState === WebSocket.OPEN) client.send(text);
    }
  });
});

server.on('upgrade', (req, socket, head) => {
  const target = req.url === '/ws' ? echo : req.url === '/ws_broadcast' ? broadcast : null;
  if (!target) { socket.destroy(); return; }
  target.handleUpgrade(req, socket, head, (ws) => target.emit('connection', ws, req));
});

server.listen(port, '127.0.0.1', () => console.log(`listening on ${port}`));
