// A gRPC client in JavaScript (@grpc/grpc-js) that drives the sidecar: unary, server
// streaming, and an error with trailers. Messages are raw bytes, like the sidecar's.
// Usage: node client.js ADDRESS CA.pem CLIENT.pem CLIENT.key   -> one JSON object on stdout
"use strict";
const fs = require("fs");
const grpc = require("@grpc/grpc-js");

const [address, caFile, certFile, keyFile] = process.argv.slice(2);
const credentials = grpc.credentials.createSsl(
  fs.readFileSync(caFile), fs.readFileSync(keyFile), fs.readFileSync(certFile));
const client = new grpc.Client(address, credentials);
const raw = (buffer) => buffer;
const deadline = () => new Date(Date.now() + 10000);
const text = (metadata) => Object.fromEntries(
  Object.entries(metadata.getMap()).map(([k, v]) => [k, Buffer.isBuffer(v) ? v.toString("hex") : v]));

function unary(metadata) {
  return new Promise((resolve) => {
    const call = client.makeUnaryRequest("/probe.Probe/Unary", raw, raw, Buffer.from("from node"),
      metadata, { deadline: deadline() }, (error, reply) => {
        if (error) resolve({ code: error.code, details: error.details, trailers: text(error.metadata) });
        else resolve({ code: 0, reply: reply.toString() });
      });
    call.on("metadata", () => {});
  });
}

function serverStream() {
  return new Promise((resolve) => {
    const metadata = new grpc.Metadata();
    metadata.set("x-probe-count", "3");
    const replies = [];
    const call = client.makeServerStreamRequest("/probe.Probe/ServerStream", raw, raw,
      Buffer.from("n"), metadata, { deadline: deadline() });
    call.on("data", (message) => replies.push(message.toString()));
    call.on("error", (error) => resolve({ code: error.code, details: error.details, replies }));
    call.on("status", (status) => { if (status.code === 0) resolve({ code: 0, replies }); });
  });
}

(async () => {
  const failing = new grpc.Metadata();
  failing.set("x-probe-status", "5");
  failing.set("x-probe-details", "no such key");
  failing.set("x-probe-trailers", "1");
  const result = {
    unary: await unary(new grpc.Metadata()),
    serverStream: await serverStream(),
    error: await unary(failing),
  };
  client.close();
  process.stdout.write(JSON.stringify(result) + "\n");
})();
