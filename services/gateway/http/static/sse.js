// Server-sent events over fetch(): unlike EventSource, fetch can POST a JSON body, send an
// Authorization header and be aborted (which closes the connection, so the gateway cancels
// the model request).

const LINE_END = /\r\n|\r|\n/;

/**
 * Yield `{event, data}` for each event of a `text/event-stream` response body.
 * Decoding is streaming UTF-8, so a character split across network chunks (common for
 * Chinese text: three bytes a character) is never shown broken.
 */
export async function* readServerSentEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder("utf-8");
  let buffer = "";
  let data = [];
  let eventName = "";
  let finished = false;
  try {
    while (!finished) {
      const { value, done } = await reader.read();
      finished = done;
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      for (;;) {
        const match = LINE_END.exec(buffer);
        if (!match) break;
        // A lone "\r" at the end may be the first half of "\r\n": wait for the next chunk.
        if (match[0] === "\r" && match.index === buffer.length - 1 && !finished) break;
        const line = buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
        if (line === "") {
          if (data.length) yield { event: eventName || "message", data: data.join("\n") };
          data = [];
          eventName = "";
          continue;
        }
        if (line.startsWith(":")) continue; // comment / keep-alive ping
        const colon = line.indexOf(":");
        const field = colon === -1 ? line : line.slice(0, colon);
        let fieldValue = colon === -1 ? "" : line.slice(colon + 1);
        if (fieldValue.startsWith(" ")) fieldValue = fieldValue.slice(1);
        if (field === "data") data.push(fieldValue);
        else if (field === "event") eventName = fieldValue;
      }
    }
    // Be lenient with a server that ends the stream without the final blank line.
    if (buffer) data.push(...(buffer.startsWith("data:") ? [buffer.slice(5).trimStart()] : []));
    if (data.length) yield { event: eventName || "message", data: data.join("\n") };
  } finally {
    if (!finished) {
      // The consumer stopped early (Stop button, page change): close the connection.
      reader.cancel().catch(() => {});
    }
    reader.releaseLock?.();
  }
}
