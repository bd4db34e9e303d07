/**
 * Splits a byte stream into lines on the byte `\n` *before* decoding, so a
 * multi-byte UTF-8 character split across chunks is decoded whole.
 */
export class LineSplitter {
  private held: Buffer[] = [];

  constructor(private readonly onLine: (line: string) => void) {}

  /** Feed the next chunk; calls `onLine` once per complete line (without the `\n`). */
  push(chunk: Uint8Array): void {
    const bytes = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    let start = 0;
    for (let nl = bytes.indexOf(0x0a); nl !== -1; nl = bytes.indexOf(0x0a, start)) {
      const tail = bytes.subarray(start, nl);
      const line = this.held.length ? Buffer.concat([...this.held, tail]) : tail;
      this.held = [];
      start = nl + 1;
      this.onLine(decode(line));
    }
    // Copy: the caller may reuse its buffer.
    if (start < bytes.length) this.held.push(Buffer.from(bytes.subarray(start)));
  }

  /** Bytes received after the last `\n`, decoded (the stream ended mid-line); clears them. */
  flush(): string | undefined {
    if (!this.held.length) return undefined;
    const rest = decode(Buffer.concat(this.held));
    this.held = [];
    return rest;
  }
}

function decode(line: Buffer): string {
  const end = line.length && line[line.length - 1] === 0x0d ? line.length - 1 : line.length;
  return line.toString("utf8", 0, end);
}
