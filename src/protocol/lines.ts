/**
 * Line-level pieces of the micropython-iot protocol (PROTOCOL.md section 1).
 * Pure and synchronous: no sockets, no timers.
 */
import { isUtf8 } from 'node:buffer';

const NL = 0x0a;

/**
 * Splits a byte stream into lines (without the `\n`), refusing to buffer more
 * than `maxLength` bytes of one line. A line that grows past the limit is reported
 * once through `onOverflow` as soon as it crosses the limit (with its first two
 * bytes, the message id of a message line), then skipped up to and including its
 * `\n`, so memory stays bounded whatever the peer sends.
 *
 * `onLine` may return false to stop: push() then returns the offset in `chunk`
 * just after that line, and the caller keeps the rest for later (the line
 * itself is the caller's to keep too). Otherwise push() returns -1.
 */
export class LineSplitter {
  private parts: Buffer[] = [];
  private partLen = 0;
  private skipping = false;

  constructor(readonly maxLength: number) {
    if (!(maxLength > 0)) throw new RangeError(`maxLength must be > 0, got ${maxLength}`);
  }

  /** Bytes held for the incomplete line (0 while skipping an oversized one). */
  get buffered(): number {
    return this.partLen;
  }

  push(chunk: Buffer, onLine: (line: Buffer) => unknown, onOverflow: (head: Buffer) => void): number {
    let start = 0;
    while (start < chunk.length) {
      const nl = chunk.indexOf(NL, start);
      const end = nl === -1 ? chunk.length : nl;
      if (this.skipping) {
        if (nl === -1) return -1;
        this.skipping = false;
        start = nl + 1;
        continue;
      }
      const len = this.partLen + (end - start);
      if (len > this.maxLength) {
        const head = this.partLen > 0 ? Buffer.concat(this.parts).subarray(0, 2) : chunk.subarray(start, start + 2);
        this.parts = [];
        this.partLen = 0;
        onOverflow(head);
        if (nl === -1) {
          this.skipping = true;
          return -1;
        }
        start = nl + 1;
        continue;
      }
      if (nl === -1) {
        this.parts.push(chunk.subarray(start));
        this.partLen = len;
        return -1;
      }
      let line: Buffer;
      if (this.partLen === 0) {
        line = chunk.subarray(start, nl);
      } else {
        this.parts.push(chunk.subarray(start, nl));
        line = Buffer.concat(this.parts, len);
        this.parts = [];
        this.partLen = 0;
      }
      start = nl + 1;
      if (onLine(line) === false) return start;
    }
    return -1;
  }
}

/** What one received line means (PROTOCOL.md 1.2). */
export type ParsedLine =
  | { kind: 'keepalive' }
  | { kind: 'ack'; mid: number }
  | { kind: 'message'; mid: number; payload: string }
  | { kind: 'invalid'; reason: string };

function hexNibble(c: number): number {
  if (c >= 0x30 && c <= 0x39) return c - 0x30; // 0-9
  if (c >= 0x61 && c <= 0x66) return c - 0x57; // a-f
  if (c >= 0x41 && c <= 0x46) return c - 0x37; // A-F (never sent, accepted)
  return -1;
}

/** The two leading hex digits of a line as a number, or -1 if they are not hex. */
export function parseMid(line: Buffer): number {
  const hi = hexNibble(line[0]);
  const lo = hexNibble(line[1]);
  return hi < 0 || lo < 0 ? -1 : (hi << 4) | lo;
}

/** Classifies one line (without its `\n`). Never throws. */
export function parseLine(line: Buffer): ParsedLine {
  if (line.length === 0) return { kind: 'keepalive' };
  if (line.length === 1) return { kind: 'invalid', reason: 'one-character line is neither keepalive, ACK nor message' };
  const mid = parseMid(line);
  if (mid < 0) return { kind: 'invalid', reason: 'first two characters are not hex digits' };
  if (line.length === 2) return { kind: 'ack', mid };
  if (!isUtf8(line)) return { kind: 'invalid', reason: 'payload is not valid UTF-8' };
  return { kind: 'message', mid, payload: line.toString('utf8', 2) };
}

const HEX = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, '0'));

/** `mid` as the two lowercase hex digits used on the wire. */
export function midHex(mid: number): string {
  return HEX[mid];
}

/** The wire form of a message: `<mid><payload>\n`. */
export function formatMessage(mid: number, payload: string): string {
  return HEX[mid] + payload + '\n';
}

/** The wire form of an ACK: `<mid>\n`. */
const ACKS = HEX.map((h) => h + '\n');

export function formatAck(mid: number): string {
  return ACKS[mid];
}

export const KEEPALIVE = '\n';

/**
 * Why a payload cannot be sent, or null if it can. `payload` is what remains after
 * one trailing `\n` has been stripped (see {@link normalizePayload}).
 */
export function payloadProblem(payload: string, maxLineLength: number): string | null {
  if (payload.length === 0) return 'empty';
  if (payload.includes('\n')) return 'newline';
  // +2 for the message id; the limit counts bytes of a line without its `\n`.
  if (Buffer.byteLength(payload) + 2 > maxLineLength) return 'too-long';
  return null;
}

/** Strips one trailing `\n`, as the original does for `write('text\n')`. */
export function normalizePayload(line: string): string {
  return line.endsWith('\n') ? line.slice(0, -1) : line;
}
