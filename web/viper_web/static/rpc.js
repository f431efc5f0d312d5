// A small Connect client (JSON codec): unary calls as plain POSTs, server streams read frame by frame.
// Protocol: https://connectrpc.com/docs/protocol. No library: fetch and streams are enough.

const CODE_OF_HTTP = {400: "invalid_argument", 401: "unauthenticated", 403: "permission_denied", 404: "not_found",
  409: "aborted", 413: "resource_exhausted", 415: "internal", 429: "resource_exhausted", 499: "canceled",
  501: "unimplemented", 503: "unavailable", 504: "deadline_exceeded"};

export class RpcError extends Error {
  constructor(code, message, requestId) {
    super(message);
    this.code = code;
    this.requestId = requestId;
  }
}

function requestId() {
  return crypto.randomUUID().replaceAll("-", "").slice(0, 16);
}

export class ViperClient {
  // token(): the bearer token to send, or "" for none.
  constructor(token) {
    this.token = token;
  }

  headers(contentType, id) {
    const headers = {"Content-Type": contentType, "Connect-Protocol-Version": "1", "X-Request-Id": id};
    const token = this.token();
    if (token) headers.Authorization = `Bearer ${token}`;
    return headers;
  }

  async post(path, contentType, body, signal, id) {
    try {
      return await fetch(path, {method: "POST", headers: this.headers(contentType, id), body, signal});
    } catch (error) {
      if (error.name === "AbortError") throw new RpcError("canceled", "cancelled", id);
      throw new RpcError("unavailable", `cannot reach the gateway (${error.message})`, id);
    }
  }

  async unary(path, request, {signal} = {}) {
    const id = requestId();
    const response = await this.post(path, "application/json", JSON.stringify(request), signal, id);
    const text = await readText(response, id);
    if (!response.ok) throw errorFromBody(response, text, id);
    return JSON.parse(text);
  }

  // Yields each response message; throws RpcError for the stream's error, if any.
  async *stream(path, request, {signal} = {}) {
    const id = requestId();
    const payload = new TextEncoder().encode(JSON.stringify(request));
    const response = await this.post(path, "application/connect+json", envelope(0, payload), signal, id);
    if (!response.ok) throw errorFromBody(response, await readText(response, id), id);
    const reader = response.body.getReader();
    let buffer = new Uint8Array(0);
    try {
      for (;;) {
        let chunk;
        try {
          chunk = await reader.read();
        } catch (error) {
          if (error.name === "AbortError") throw new RpcError("canceled", "cancelled", id);
          throw new RpcError("unavailable", `the stream broke off (${error.message})`, id);
        }
        if (chunk.done) throw new RpcError("unavailable", "the stream ended without its end message", id);
        buffer = concat(buffer, chunk.value);
        while (buffer.length >= 5) {
          const view = new DataView(buffer.buffer, buffer.byteOffset, buffer.byteLength);
          const flags = view.getUint8(0);
          const length = view.getUint32(1);
          if (buffer.length < 5 + length) break;
          const data = JSON.parse(new TextDecoder().decode(buffer.subarray(5, 5 + length)));
          buffer = buffer.subarray(5 + length);
          if (flags & 0x02) {
            if (data.error) throw new RpcError(data.error.code || "unknown", data.error.message || "", id);
            return;
          }
          yield data;
        }
      }
    } finally {
      reader.releaseLock();
    }
  }
}

async function readText(response, id) {
  try {
    return await response.text();
  } catch (error) {
    if (error.name === "AbortError") throw new RpcError("canceled", "cancelled", id);
    throw new RpcError("unavailable", `the response broke off (${error.message})`, id);
  }
}

function errorFromBody(response, text, id) {
  let body = {};
  try {
    body = JSON.parse(text);
  } catch {
    // Not a Connect error (a proxy's page, a 415): the status says enough.
  }
  const code = body.code || CODE_OF_HTTP[response.status] || "unknown";
  return new RpcError(code, body.message || text.trim() || `HTTP ${response.status}`, id);
}

function envelope(flags, payload) {
  const out = new Uint8Array(5 + payload.length);
  const view = new DataView(out.buffer);
  view.setUint8(0, flags);
  view.setUint32(1, payload.length);
  out.set(payload, 5);
  return out;
}

function concat(a, b) {
  if (a.length === 0) return b;
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

// Bytes <-> base64, the JSON form of protobuf bytes fields.
export function toBase64(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

export function pngUrl(base64) {
  return `data:image/png;base64,${base64}`;
}
