// Peer for Herald's realistic benchmarks (bench/realistic.py: S5, S7, S8):
// Socket.IO 4 on Node, written as a Socket.IO team would, with its own rooms API.
// Usage: node server.js PORT   (BENCH_JWT_SECRET set: a connection may carry an
// HS256 token in its handshake `auth.token`, verified with jsonwebtoken).
//
//   emit("join", [room, ...], ack)   socket.join(rooms); ack(true)
//   emit("pub", {room, data}, ack?)  io.to(room).emit("msg", data); ack(true) if asked
//
// What it does not offer (Herald does): no history and no recovery of missed
// messages after a reconnect (Socket.IO's connection-state recovery keeps one
// in-memory session for 2 min and is off here, as by default); no presence; no
// bounded per-client outbound queue (a client that does not read grows the
// server's buffers until the ping timeout); no per-channel offsets.
'use strict';
const http = require('http');
const { Server } = require('socket.io');
const jwt = require('jsonwebtoken');

const port = Number(process.argv[2] || 8000);
const secret = process.env.BENCH_JWT_SECRET || '';
const server = http.createServer((req, res) => { res.writeHead(404); res.end(); });
const io = new Server(server, { transports: ['websocket'], serveClient: false, cors: { origin: '*' } });

io.use((socket, next) => {
  const token = socket.handshake.auth && socket.handshake.auth.token;
  if (!token) return next();
  try {
    socket.data.user = jwt.verify(token, secret, { algorithms: ['HS256'] }).sub;
    next();
  } catch (err) {
    next(new Error('unauthorized'));
  }
});

io.on('connection', (socket) => {
  socket.on('join', (rooms, ack) => {
    socket.join(rooms);
    if (typeof ack === 'function') ack(true);
  });
  socket.on('pub', (msg, ack) => {
    io.to(msg.room).emit('msg', msg.data);
    if (typeof ack === 'function') ack(true);
  });
});

server.listen(port, '127.0.0.1', () => console.log(`listening on ${port}`));
