/**
 * UART framing of the mesh root (PROTOCOL.md section 2.1), pure and synchronous.
 *
 * 0xFF starts a frame, 0xFE ends it, 0xFA escapes: every byte >= 0xFA inside a
 * frame is sent as 0xFA followed by (byte XOR 0xFA). There is no length,
 * checksum or sequence number, so the decoder can only drop what is visibly
 * wrong: bytes outside a frame (noise), a frame cut short by a new start byte,
 * a frame over the size limit, an escape followed by a special byte.
 */
export const FRAME_START = 0xff;
export const FRAME_END = 0xfe;
export const FRAME_ESC = 0xfa;

/** Encodes one frame body. */
export function encodeFrame(body: Uint8Array): Buffer {
  let extra = 0;
  for (const b of body) if (b >= FRAME_ESC) extra++;
  const out = Buffer.allocUnsafe(body.length + extra + 2);
  let o = 0;
  out[o++] = FRAME_START;
  for (const b of body) {
    if (b >= FRAME_ESC) {
      out[o++] = FRAME_ESC;
      out[o++] = b ^ FRAME_ESC;
    } else {
      out[o++] = b;
    }
  }
  out[o++] = FRAME_END;
  return out;
}

export type FrameDropReason = 'restarted' | 'oversized' | 'bad-escape';

export interface FrameDecoderStats {
  frames: number;
  /** Bytes seen outside any frame. */
  noiseBytes: number;
  /** Frames abandoned because a start byte came before their end byte. */
  restarted: number;
  oversized: number;
  /** Frames with an escape byte followed by a start/end/escape byte. */
  badEscape: number;
}

/**
 * Streaming decoder: feed it whatever the serial port delivers; it calls
 * `onFrame` with each complete body and `onDrop` for each frame it throws away.
 */
export class FrameDecoder {
  readonly stats: FrameDecoderStats = { frames: 0, noiseBytes: 0, restarted: 0, oversized: 0, badEscape: 0 };
  private buf: Buffer;
  private len = 0;
  private inFrame = false;
  private escaped = false;
  /** Dropping an oversized frame: skip to the next start byte. */
  private skipping = false;

  constructor(readonly maxFrame = 4096) {
    if (!(maxFrame > 0)) throw new RangeError(`maxFrame must be > 0, got ${maxFrame}`);
    this.buf = Buffer.allocUnsafe(Math.min(maxFrame, 1024));
  }

  push(chunk: Uint8Array, onFrame: (body: Buffer) => void, onDrop?: (why: FrameDropReason) => void): void {
    for (let i = 0; i < chunk.length; i++) {
      const b = chunk[i];
      if (b === FRAME_START) {
        if (this.inFrame && !this.skipping) {
          this.stats.restarted++;
          onDrop?.('restarted');
        }
        this.inFrame = true;
        this.skipping = this.escaped = false;
        this.len = 0;
        continue;
      }
      if (!this.inFrame) {
        this.stats.noiseBytes++;
        continue;
      }
      if (this.skipping) {
        if (b === FRAME_END) this.inFrame = this.skipping = false;
        continue;
      }
      if (b === FRAME_END) {
        if (this.escaped) {
          this.drop('bad-escape', onDrop);
          continue;
        }
        this.inFrame = false;
        this.stats.frames++;
        onFrame(Buffer.from(this.buf.subarray(0, this.len)));
        continue;
      }
      let v = b;
      if (this.escaped) {
        this.escaped = false;
        if (b === FRAME_ESC) {
          this.drop('bad-escape', onDrop);
          continue;
        }
        v = b ^ FRAME_ESC;
      } else if (b === FRAME_ESC) {
        this.escaped = true;
        continue;
      }
      if (this.len >= this.maxFrame) {
        this.stats.oversized++;
        onDrop?.('oversized');
        this.skipping = true;
        continue;
      }
      if (this.len === this.buf.length) {
        const bigger = Buffer.allocUnsafe(Math.min(this.maxFrame, this.buf.length * 2));
        this.buf.copy(bigger, 0, 0, this.len);
        this.buf = bigger;
      }
      this.buf[this.len++] = v;
    }
  }

  private drop(why: 'bad-escape', onDrop?: (why: FrameDropReason) => void): void {
    this.stats.badEscape++;
    onDrop?.(why);
    this.inFrame = this.escaped = false;
    this.len = 0;
  }
}

// ---- frame bodies (PROTOCOL.md 2.2 and 2.3) ----------------------------------

/** Root → server opcodes. 0x00-0x03 and 'D' are the mesh firmware's; 0x04 and 0x05 are tether's. */
export const Op = {
  LINE: 0x00,
  NET_INFO: 0x01,
  NODE_UP: 0x02,
  ROOT_RESET: 0x03,
  NODE_DOWN: 0x04,
  RESULT: 0x05,
  DATA: 0x44,
} as const;

export type RootMessage =
  | { op: 'line'; addr: number; data: Buffer }
  | { op: 'net-info'; addr: number; nodes: Array<{ addr: number; uuid: string }> }
  | { op: 'node-up'; addr: number; uuid: string }
  | { op: 'root-reset'; addr: number }
  | { op: 'node-down'; addr: number }
  | { op: 'result'; addr: number; ok: true }
  | { op: 'result'; addr: number; ok: false; error: string }
  | { op: 'data'; addr: number; items: Array<{ type: number; raw: Buffer }> }
  | { op: 'unknown'; addr: number; opcode: number };

/** Byte length of a DATA value, by data-type id; undefined = unknown type. */
export type DataLengths = (typeId: number) => number | undefined;

export class BodyError extends Error {}

const uuidHex = (b: Buffer) => b.toString('hex');

/** Parses a root → server frame body. Throws BodyError for a malformed body. */
export function parseRootBody(body: Buffer, dataLength: DataLengths = () => undefined): RootMessage {
  if (body.length < 3) throw new BodyError(`frame body of ${body.length} bytes is shorter than addr + opcode`);
  const addr = body.readUInt16BE(0);
  const opcode = body[2];
  const data = body.subarray(3);
  switch (opcode) {
    case Op.LINE:
      return { op: 'line', addr, data };
    case Op.NET_INFO: {
      if (data.length < 1) throw new BodyError('NET_INFO without a count');
      const n = data[0];
      if (data.length !== 1 + n * 18) throw new BodyError(`NET_INFO says ${n} nodes but has ${data.length - 1} bytes of entries`);
      const nodes = [];
      for (let i = 0; i < n; i++) {
        const at = 1 + i * 18;
        nodes.push({ addr: data.readUInt16BE(at), uuid: uuidHex(data.subarray(at + 2, at + 18)) });
      }
      return { op: 'net-info', addr, nodes };
    }
    case Op.NODE_UP:
      if (data.length !== 16) throw new BodyError(`NODE_UP needs a 16-byte UUID, got ${data.length} bytes`);
      return { op: 'node-up', addr, uuid: uuidHex(data) };
    case Op.ROOT_RESET:
      return { op: 'root-reset', addr };
    case Op.NODE_DOWN:
      return { op: 'node-down', addr };
    case Op.RESULT: {
      if (data.length === 1 && data[0] === 0x53 /* S */) return { op: 'result', addr, ok: true };
      if (data.length >= 2 && data[0] === 0x46 /* F */ && data.length === 2 + data[1]) {
        return { op: 'result', addr, ok: false, error: data.subarray(2).toString('utf8') };
      }
      throw new BodyError('RESULT must be "S", or "F" len(1) text');
    }
    case Op.DATA: {
      if (data.length < 1) throw new BodyError('DATA without a count');
      const n = data[0];
      const items = [];
      let at = 1;
      for (let i = 0; i < n; i++) {
        if (at >= data.length) throw new BodyError(`DATA says ${n} values but ends after ${i}`);
        const type = data[at++];
        const len = dataLength(type);
        if (len === undefined) throw new BodyError(`DATA value of unknown type id ${type}: add it to the data-type table`);
        if (at + len > data.length) throw new BodyError(`DATA value of type ${type} is cut short`);
        items.push({ type, raw: data.subarray(at, at + len) });
        at += len;
      }
      if (at !== data.length) throw new BodyError(`DATA has ${data.length - at} bytes after its ${n} values`);
      return { op: 'data', addr, items };
    }
    default:
      return { op: 'unknown', addr, opcode };
  }
}

/** Server → root commands (PROTOCOL.md 2.3). */
export type RootCommand = 'SEND-' | 'SENDI' | 'BCAST' | 'RST-R' | 'CLEAN' | 'NINFO';

/** Encodes a server → root command body (not yet framed). */
export function commandBody(cmd: RootCommand, addr: number, data: Uint8Array = Buffer.alloc(0)): Buffer {
  const body = Buffer.allocUnsafe(7 + data.length);
  body.write(cmd, 0, 'ascii');
  body.writeUInt16BE(addr, 5);
  body.set(data, 7);
  return body;
}

/** Parses a server → root command body (the emulator's side). */
export function parseCommandBody(body: Buffer): { cmd: string; addr: number; data: Buffer } {
  if (body.length < 7) throw new BodyError(`command body of ${body.length} bytes is shorter than command + addr`);
  return { cmd: body.toString('ascii', 0, 5), addr: body.readUInt16BE(5), data: body.subarray(7) };
}

/** Root → server body builders (the emulator's side). */
export function rootBody(addr: number, opcode: number, data: Uint8Array = Buffer.alloc(0)): Buffer {
  const body = Buffer.allocUnsafe(3 + data.length);
  body.writeUInt16BE(addr, 0);
  body[2] = opcode;
  body.set(data, 3);
  return body;
}

export function resultBody(ok: boolean, error = ''): Buffer {
  if (ok) return rootBody(0, Op.RESULT, Buffer.from('S'));
  const utf8 = Buffer.from(error, 'utf8');
  // At most 255 bytes, cut before a character, never inside one (0b10xxxxxx = continuation byte).
  let cut = Math.min(utf8.length, 255);
  while (cut < utf8.length && (utf8[cut] & 0xc0) === 0x80) cut--;
  const text = utf8.subarray(0, cut);
  return rootBody(0, Op.RESULT, Buffer.concat([Buffer.from([0x46, text.length]), text]));
}
