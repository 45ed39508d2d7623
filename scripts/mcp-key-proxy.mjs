// A key-adding proxy on loopback, for the MCP conformance suite (which cannot
// send headers): every request to 127.0.0.1:<port> is forwarded to TARGET with
// `X-Muxi-Client-Key: KEY` added, everything else (Host included) unchanged,
// and the answer streamed back (SSE too). Prints `proxy listening on <port>`.
//
// Usage: node mcp-key-proxy.mjs TARGET_ORIGIN KEY   (e.g. http://127.0.0.1:7890 fmc_...)
import http from "node:http";

const [target, key] = process.argv.slice(2);
if (!target || !key) {
  console.error("usage: node mcp-key-proxy.mjs TARGET_ORIGIN KEY");
  process.exit(2);
}
const upstream = new URL(target);
const agent = new http.Agent({ keepAlive: true });

const server = http.createServer((req, res) => {
  const headers = { ...req.headers, "x-muxi-client-key": key };
  const forward = http.request(
    {
      host: upstream.hostname,
      port: upstream.port,
      method: req.method,
      path: req.url,
      headers,
      agent,
      setHost: false,
    },
    (answer) => {
      res.writeHead(answer.statusCode ?? 502, answer.headers);
      res.flushHeaders();
      answer.pipe(res);
    },
  );
  forward.on("error", (err) => {
    if (!res.headersSent) {
      res.writeHead(502, { "content-type": "text/plain" });
    }
    res.end(`proxy error: ${err.message}`);
  });
  res.on("close", () => forward.destroy());
  req.pipe(forward);
});

server.listen(0, "127.0.0.1", () => {
  console.log(`proxy listening on ${server.address().port}`);
});
for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, () => process.exit(0));
}
