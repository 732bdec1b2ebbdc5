/**
 * Property-based fuzzing (fast-check) of every parser tether exposes to the
 * outside world, plus one end-to-end run of arbitrary bytes against a real
 * line server on 127.0.0.1.
 *
 * Every property runs with the fixed seed below, so a failure reproduces
 * exactly: fast-check prints the shrunk counterexample and the `path` to replay.
 * Tests whose comment says "Regression" found a real bug in src/ that is now fixed.
 */
import test from 'ava';
import fc from 'fast-check';
import * as net from 'node:net';
import { Client, hashSecret, parseIdLine, Server, silentLogger, TetherError, verifySecret } from '../src';
import { CONFIG_DEFAULTS, HTTP_CONFIG_DEFAULTS, resolveConfig, TetherConfig } from '../src/config';
import { DEFAULT_FILTER, HttpProblem, SEND_TIMEOUT, SORT_FIELDS, validate } from '../src/http';
import {
  BodyError,
  commandBody,
  encodeFrame,
  FRAME_END,
  FRAME_ESC,
  FRAME_START,
  FrameDecoder,
  FrameDropReason,
  Op,
  parseCommandBody,
  parseRootBody,
  resultBody,
  RootCommand,
  rootBody,
} from '../src/protocol/frames';
import { DuplicateRing, MidGenerator } from '../src/protocol/ids';
import { formatAck, formatMessage, LineSplitter, parseLine, parseMid } from '../src/protocol/lines';
import { eventually, within } from './helpers/wait';

const SEED = 424242;
const run = (n: number) => ({ seed: SEED, numRuns: n });

// ---- shared arbitraries and helpers ---------------------------------------------

/** Cut `buf` at arbitrary offsets (empty chunks included: they must be harmless). */
function splitAt(buf: Buffer, cuts: number[]): Buffer[] {
  const at = [...new Set(cuts.map((c) => c % (buf.length + 1)))].sort((a, b) => a - b);
  const out: Buffer[] = [];
  let prev = 0;
  for (const c of at) {
    out.push(buf.subarray(prev, c));
    prev = c;
  }
  out.push(buf.subarray(prev));
  return out;
}

const cuts = fc.array(fc.nat(), { maxLength: 12 });

/** Bytes, biased towards the ones every parser here treats specially. */
const byte = fc.oneof(
  { weight: 3, arbitrary: fc.integer({ min: 0, max: 255 }) },
  { weight: 1, arbitrary: fc.constantFrom(0x0a, 0x30, 0x61, 0x66, 0x46, FRAME_START, FRAME_END, FRAME_ESC, 0xfb, 0x00, 0xc3, 0x80) },
);
const bytes = (maxLength: number) => fc.array(byte, { maxLength }).map((a) => Buffer.from(a));

/** A line's bytes: anything but `\n`. */
const lineBytes = (maxLength: number) => fc.array(byte.filter((b) => b !== 0x0a), { maxLength }).map((a) => Buffer.from(a));

/** Well-formed unicode text without `\n`. */
const text = (c: { minLength?: number; maxLength?: number } = {}) =>
  fc.string({ unit: 'grapheme', minLength: c.minLength ?? 0, maxLength: c.maxLength ?? 20 }).filter((s) => !s.includes('\n'));

/** Names that live on Object.prototype: the classic trap for `table[key]` lookups. */
const PROTO_KEYS = ['__proto__', 'constructor', 'toString', 'valueOf', 'hasOwnProperty', '__defineGetter__', 'isPrototypeOf'];

/** An object with exactly these own keys (Object.fromEntries makes `__proto__` an own key, as JSON.parse does). */
const objectOf = (entries: Array<[string, unknown]>) => Object.fromEntries(entries);

// ---- 1. LineSplitter --------------------------------------------------------------

test('LineSplitter: any lines in any chunking come out exactly, long ones reported once each', (t) => {
  fc.assert(
    fc.property(
      fc.integer({ min: 1, max: 24 }),
      fc.array(lineBytes(40), { maxLength: 20 }),
      fc.option(lineBytes(40), { nil: undefined }),
      cuts,
      (maxLength, lines, tail, cutPoints) => {
        const stream = Buffer.concat([...lines.flatMap((l) => [l, Buffer.from('\n')]), tail ?? Buffer.alloc(0)]);
        const splitter = new LineSplitter(maxLength);
        const got: string[] = [];
        let overflows = 0;
        for (const chunk of splitAt(stream, cutPoints)) {
          splitter.push(
            chunk,
            (line) => got.push(line.toString('hex')),
            () => overflows++,
          );
          if (splitter.buffered > maxLength) return false;
        }
        const tailLen = tail?.length ?? 0;
        const tooLong = lines.filter((l) => l.length > maxLength).length + (tailLen > maxLength ? 1 : 0);
        return (
          JSON.stringify(got) === JSON.stringify(lines.filter((l) => l.length <= maxLength).map((l) => l.toString('hex'))) &&
          overflows === tooLong &&
          splitter.buffered === (tailLen > maxLength ? 0 : tailLen)
        );
      },
    ),
    run(1500),
  );
  t.pass();
});

test('LineSplitter: random byte chunks never throw and never buffer more than maxLength', (t) => {
  fc.assert(
    fc.property(fc.integer({ min: 1, max: 64 }), fc.array(bytes(100), { maxLength: 20 }), (maxLength, chunks) => {
      const splitter = new LineSplitter(maxLength);
      for (const chunk of chunks) {
        splitter.push(
          chunk,
          (line) => {
            if (line.length > maxLength || line.includes(0x0a)) throw new Error(`bad line emitted: ${line.toString('hex')}`);
          },
          () => {},
        );
        if (splitter.buffered > maxLength) return false;
      }
      return true;
    }),
    run(1500),
  );
  t.pass();
});

// ---- 2. parseLine / parseMid / formatMessage / formatAck ---------------------------

test('parseLine: any bytes classify as keepalive/ack/message/invalid without throwing', (t) => {
  fc.assert(
    fc.property(fc.oneof(bytes(30), fc.uint8Array({ maxLength: 30 }).map((a) => Buffer.from(a))), (line) => {
      const p = parseLine(line);
      switch (p.kind) {
        case 'keepalive':
          return line.length === 0;
        case 'ack':
          return line.length === 2 && p.mid === parseMid(line) && p.mid >= 0 && p.mid <= 255;
        case 'message':
          return line.length > 2 && p.mid === parseMid(line) && p.mid >= 0 && p.mid <= 255 && typeof p.payload === 'string';
        case 'invalid':
          return line.length > 0 && typeof p.reason === 'string';
        default:
          return false;
      }
    }),
    run(3000),
  );
  t.pass();
});

test('formatMessage / formatAck round-trip through parseLine for any mid and unicode payload', (t) => {
  fc.assert(
    fc.property(fc.integer({ min: 0, max: 255 }), text({ minLength: 1, maxLength: 30 }), (mid, payload) => {
      const wire = formatMessage(mid, payload);
      if (!wire.endsWith('\n') || wire.indexOf('\n') !== wire.length - 1) return false;
      const msg = parseLine(Buffer.from(wire).subarray(0, -1));
      const ack = parseLine(Buffer.from(formatAck(mid)).subarray(0, -1));
      return (
        JSON.stringify(msg) === JSON.stringify({ kind: 'message', mid, payload }) &&
        JSON.stringify(ack) === JSON.stringify({ kind: 'ack', mid }) &&
        parseMid(Buffer.from(wire)) === mid
      );
    }),
    run(2000),
  );
  t.pass();
});

// ---- 3. DuplicateRing and MidGenerator ----------------------------------------------

/** The duplicate ring as PROTOCOL.md 1.3 states it, one boolean per id. */
class RingModel {
  seen = new Array<boolean>(256).fill(false);
  isNew(mid: number): boolean {
    if (mid === 0) this.seen.fill(false);
    const fresh = !this.seen[mid];
    this.seen[mid] = true;
    const far = ((mid >> 3) + 16) & 31;
    for (let i = 0; i < 8; i++) this.seen[far * 8 + i] = false;
    return fresh;
  }
  bytes(): number[] {
    const out = new Array<number>(32).fill(0);
    this.seen.forEach((s, mid) => {
      if (s) out[mid >> 3] |= 1 << (mid & 7);
    });
    return out;
  }
}

const mid = fc.oneof(fc.integer({ min: 0, max: 255 }), fc.integer({ min: 0, max: 20 }), fc.constantFrom(0, 127, 128, 255));

test('DuplicateRing agrees with a boolean-array model on any sequence of mids', (t) => {
  fc.assert(
    fc.property(fc.array(mid, { maxLength: 300 }), (mids) => {
      const ring = new DuplicateRing();
      const model = new RingModel();
      for (const m of mids) {
        if (ring.isNew(m) !== model.isNew(m)) return false;
        if (JSON.stringify([...ring.snapshot()]) !== JSON.stringify(model.bytes())) return false;
      }
      return true;
    }),
    run(300),
  );
  t.pass();
});

test('DuplicateRing snapshot/restore: a restored ring behaves exactly like the original', (t) => {
  fc.assert(
    fc.property(fc.array(mid, { maxLength: 200 }), fc.array(mid, { maxLength: 200 }), (before, after) => {
      const a = new DuplicateRing();
      for (const m of before) a.isNew(m);
      const snap = a.snapshot();
      const b = new DuplicateRing();
      b.restore(snap);
      if (Buffer.compare(Buffer.from(b.snapshot()), Buffer.from(snap)) !== 0) return false;
      snap.fill(0xff); // the snapshot is a copy: scribbling on it changes neither ring
      for (const m of after) if (a.isNew(m) !== b.isNew(m)) return false;
      return Buffer.compare(Buffer.from(a.snapshot()), Buffer.from(b.snapshot())) === 0;
    }),
    run(300),
  );
  t.pass();
});

test('DuplicateRing.restore accepts exactly 32 bytes', (t) => {
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 64 }), (raw) => {
      const ring = new DuplicateRing();
      try {
        ring.restore(raw);
      } catch (e) {
        return raw.length !== 32 && e instanceof RangeError;
      }
      return raw.length === 32 && Buffer.compare(Buffer.from(ring.snapshot()), Buffer.from(raw)) === 0;
    }),
    run(300),
  );
  t.pass();
});

test('MidGenerator: a fresh generator yields 0, 1..255, 1..255, … for any length', (t) => {
  fc.assert(
    fc.property(fc.integer({ min: 0, max: 1200 }), (n) => {
      const gen = new MidGenerator();
      for (let i = 0; i < n; i++) {
        const expected = i === 0 ? 0 : ((i - 1) % 255) + 1;
        if (gen.next !== expected || gen.take() !== expected) return false;
      }
      return true;
    }),
    run(200),
  );
  t.pass();
});

// ---- 4. UART frames ---------------------------------------------------------------

interface Decoded {
  frames: Buffer[];
  drops: FrameDropReason[];
}

function decodeAll(decoder: FrameDecoder, chunks: Buffer[], into: Decoded = { frames: [], drops: [] }): Decoded {
  for (const c of chunks)
    decoder.push(
      c,
      (f) => into.frames.push(f),
      (why) => into.drops.push(why),
    );
  return into;
}

const frameBody = fc.oneof(bytes(60), fc.uint8Array({ maxLength: 60 }).map((a) => Buffer.from(a)), fc.array(fc.constantFrom(0xff, 0xfe, 0xfa, 0xfb, 0x05), { maxLength: 20 }).map((a) => Buffer.from(a)));

test('frames: decode(encode(bodies)) is the bodies, back to back, in any chunking', (t) => {
  fc.assert(
    fc.property(fc.array(frameBody, { maxLength: 8 }), cuts, (bodies, cutPoints) => {
      const wire = Buffer.concat(bodies.map(encodeFrame));
      const decoder = new FrameDecoder();
      const out = decodeAll(decoder, splitAt(wire, cutPoints));
      return (
        out.drops.length === 0 &&
        out.frames.length === bodies.length &&
        out.frames.every((f, i) => f.equals(bodies[i])) &&
        decoder.stats.frames === bodies.length &&
        decoder.stats.noiseBytes === 0
      );
    }),
    run(1000),
  );
  t.pass();
});

test('frames: encodeFrame escapes every byte >= 0xfa, so only the delimiters are special', (t) => {
  fc.assert(
    fc.property(frameBody, (body) => {
      const wire = encodeFrame(body);
      const inner = wire.subarray(1, -1);
      return wire[0] === FRAME_START && wire[wire.length - 1] === FRAME_END && !inner.includes(FRAME_START) && !inner.includes(FRAME_END);
    }),
    run(1000),
  );
  t.pass();
});

test('frames: a body is dropped as oversized exactly when it is longer than maxFrame', (t) => {
  fc.assert(
    fc.property(fc.integer({ min: 1, max: 40 }), fc.array(frameBody, { maxLength: 6 }), cuts, (maxFrame, bodies, cutPoints) => {
      const decoder = new FrameDecoder(maxFrame);
      const out = decodeAll(decoder, splitAt(Buffer.concat(bodies.map(encodeFrame)), cutPoints));
      const fit = bodies.filter((b) => b.length <= maxFrame);
      return (
        out.frames.length === fit.length &&
        out.frames.every((f, i) => f.equals(fit[i])) &&
        decoder.stats.oversized === bodies.length - fit.length &&
        out.drops.every((d) => d === 'oversized')
      );
    }),
    run(1000),
  );
  t.pass();
});

test('frames: arbitrary bytes never throw, stats match the callbacks, and a frame after the junk still decodes', (t) => {
  fc.assert(
    fc.property(
      fc.integer({ min: 1, max: 64 }),
      bytes(200),
      cuts,
      frameBody,
      fc.option(bytes(40), { nil: undefined }),
      cuts,
      (maxFrame, junk, junkCuts, body, trailer, cutPoints) => {
        fc.pre(body.length <= maxFrame);
        const decoder = new FrameDecoder(maxFrame);
        const out = decodeAll(decoder, splitAt(junk, junkCuts));
        const { restarted, oversized, badEscape, frames, noiseBytes } = decoder.stats;
        if (frames !== out.frames.length || restarted + oversized + badEscape !== out.drops.length || noiseBytes > junk.length) return false;
        if (out.frames.some((f) => f.length > maxFrame)) return false;
        const before = out.frames.length;
        // The frame's own start byte resynchronises the decoder whatever state the junk left.
        const rest = Buffer.concat([encodeFrame(body), trailer ? Buffer.concat([Buffer.from([FRAME_START]), trailer]) : Buffer.alloc(0)]);
        decodeAll(decoder, splitAt(rest, cutPoints), out);
        return out.frames.length > before && out.frames[before].equals(body);
      },
    ),
    run(1500),
  );
  t.pass();
});

/** A data-type table: some type ids have a length (possibly 0), the rest are unknown. */
const dataLengths = fc.func(fc.option(fc.integer({ min: 0, max: 6 }), { nil: undefined }));
const opcode = fc.oneof(fc.constantFrom(...Object.values(Op)), fc.integer({ min: 0, max: 255 }));

test('parseRootBody: arbitrary bytes either parse or throw BodyError, nothing else', (t) => {
  fc.assert(
    fc.property(
      fc.oneof(
        bytes(80),
        fc.tuple(fc.integer({ min: 0, max: 0xffff }), opcode, bytes(80)).map(([addr, op, data]) => rootBody(addr, op, data)),
        // Plausible counts: NET_INFO / DATA with a count byte and about the right amount of bytes.
        fc.tuple(fc.integer({ min: 0, max: 0xffff }), fc.constantFrom(Op.NET_INFO, Op.DATA, Op.RESULT), fc.integer({ min: 0, max: 4 }), bytes(80)).map(([addr, op, n, data]) =>
          rootBody(addr, op, Buffer.concat([Buffer.from([n]), data])),
        ),
      ),
      fc.boolean(),
      dataLengths,
      (body, withTable, table) => {
        try {
          const m = withTable ? parseRootBody(body, table) : parseRootBody(body);
          return m.addr === body.readUInt16BE(0);
        } catch (e) {
          if (e instanceof BodyError) return true;
          throw e;
        }
      },
    ),
    run(2000),
  );
  t.pass();
});

const addr = fc.integer({ min: 0, max: 0xffff });
const uuid = fc.uint8Array({ minLength: 16, maxLength: 16 }).map((a) => Buffer.from(a));

test('root bodies built by rootBody/resultBody parse back to what was built', (t) => {
  const msg = fc.oneof(
    fc.record({ op: fc.constant('line' as const), addr, data: bytes(40) }),
    fc.record({ op: fc.constant('node-up' as const), addr, uuid }),
    fc.record({ op: fc.constant('net-info' as const), addr, nodes: fc.array(fc.record({ addr, uuid }), { maxLength: 5 }) }),
    fc.record({ op: fc.constantFrom('root-reset' as const, 'node-down' as const), addr }),
    fc.record({ op: fc.constant('data' as const), addr, items: fc.array(fc.record({ type: fc.integer({ min: 0, max: 9 }), seed: bytes(9) }), { maxLength: 6 }) }),
  );
  const len = (type: number) => type; // type id n has n bytes, so 0 is a valid length too
  fc.assert(
    fc.property(msg, (m) => {
      switch (m.op) {
        case 'line': {
          const p = parseRootBody(rootBody(m.addr, Op.LINE, m.data));
          return p.op === 'line' && p.addr === m.addr && p.data.equals(m.data);
        }
        case 'node-up': {
          const p = parseRootBody(rootBody(m.addr, Op.NODE_UP, m.uuid));
          return p.op === 'node-up' && p.addr === m.addr && p.uuid === m.uuid.toString('hex');
        }
        case 'net-info': {
          const entries = m.nodes.map((n) => {
            const e = Buffer.alloc(18);
            e.writeUInt16BE(n.addr, 0);
            n.uuid.copy(e, 2);
            return e;
          });
          const p = parseRootBody(rootBody(m.addr, Op.NET_INFO, Buffer.concat([Buffer.from([m.nodes.length]), ...entries])));
          return (
            p.op === 'net-info' &&
            p.addr === m.addr &&
            JSON.stringify(p.nodes) === JSON.stringify(m.nodes.map((n) => ({ addr: n.addr, uuid: n.uuid.toString('hex') })))
          );
        }
        case 'root-reset':
        case 'node-down': {
          const p = parseRootBody(rootBody(m.addr, m.op === 'root-reset' ? Op.ROOT_RESET : Op.NODE_DOWN));
          return p.op === m.op && p.addr === m.addr;
        }
        case 'data': {
          const items = m.items.map((i) => ({ type: i.type, raw: Buffer.concat([i.seed, Buffer.alloc(9)]).subarray(0, len(i.type)) }));
          const data = Buffer.concat([Buffer.from([items.length]), ...items.flatMap((i) => [Buffer.from([i.type]), i.raw])]);
          const p = parseRootBody(rootBody(m.addr, Op.DATA, data), len);
          return (
            p.op === 'data' &&
            p.addr === m.addr &&
            p.items.length === items.length &&
            p.items.every((x, k) => x.type === items[k].type && x.raw.equals(items[k].raw))
          );
        }
      }
    }),
    run(1000),
  );
  t.pass();
});

test('resultBody: parses back as ok, or as the error text cut to at most 255 bytes on a character boundary', (t) => {
  fc.assert(
    fc.property(fc.boolean(), fc.oneof(text({ maxLength: 40 }), text({ minLength: 60, maxLength: 300 })), (ok, error) => {
      const p = parseRootBody(resultBody(ok, error));
      if (p.op !== 'result' || p.addr !== 0 || p.ok !== ok) return false;
      if (p.ok) return true;
      const fits = Buffer.byteLength(error) <= 255;
      return Buffer.byteLength(p.error) <= 255 && error.startsWith(p.error) && (!fits || p.error === error) && !p.error.includes('\ufffd');
    }),
    run(1000),
  );
  t.pass();
});

test('commandBody / parseCommandBody round-trip', (t) => {
  const cmd = fc.constantFrom<RootCommand>('SEND-', 'SENDI', 'BCAST', 'RST-R', 'CLEAN', 'NINFO');
  fc.assert(
    fc.property(cmd, addr, fc.option(bytes(60), { nil: undefined }), (c, a, data) => {
      const p = parseCommandBody(commandBody(c, a, data));
      return p.cmd === c && p.addr === a && p.data.equals(data ?? Buffer.alloc(0));
    }),
    run(1000),
  );
  fc.assert(
    fc.property(bytes(20), (body) => {
      try {
        const p = parseCommandBody(body);
        return body.length >= 7 && p.data.length === body.length - 7;
      } catch (e) {
        if (e instanceof BodyError) return body.length < 7;
        throw e;
      }
    }),
    run(500),
  );
  t.pass();
});

// ---- 5. config loader -------------------------------------------------------------

const CONFIG_KEYS = [
  'host', 'server', 'port', 'timeout', 'settleDelay', 'maxLineLength', 'maxIdLength', 'idTimeout', 'rxBuffer',
  'maxQueuedWrites', 'window', 'clients', 'allow', 'duplicateId', 'apps', 'types', 'mesh', 'persist', 'log', 'http',
];
const MESH_KEYS = ['path', 'baudRate', 'dataBits', 'stopBits', 'parity', 'rtscts', 'maxFrame', 'send', 'commandTimeout', 'maxOutstanding', 'reopenMin', 'reopenMax', 'quarantine', 'dataTypes'];
const HTTP_KEYS = ['host', 'port', 'token'];

/** Values near and across every check's edges, mixed with arbitrary JSON. */
const edgy = fc.oneof(
  { weight: 3, arbitrary: fc.jsonValue({ maxDepth: 2 }) },
  {
    weight: 2,
    arbitrary: fc.constantFrom<unknown>(
      null, true, false, 0, -1, 1, 1.5, 7, 8, 39, 40, 100, 101, 5, 65535, 65536, 600_000, 3_600_000, 3_600_001, 4_000_001,
      '', ' ', 'x', 'a\nb', '*', 'ignore-new', 'replace-old', 'info', 'json', 'pretty', 'silent', 'verbose',
      'none', 'SEND-', 'SENDI', [], [''], ['a'], ['a\nb'], {}, { dir: 'd' }, { dir: 1 }, { script: 's' }, '/dev/ttyUSB0',
    ),
  },
  { weight: 1, arbitrary: fc.array(fc.string({ maxLength: 4 }), { maxLength: 3 }) },
);
const keyedObject = (keys: string[], value: fc.Arbitrary<unknown>) =>
  fc.array(fc.tuple(fc.constantFrom(...keys), value), { maxLength: 6 }).map(objectOf);
const sectionValue = fc.oneof(
  { weight: 3, arbitrary: edgy },
  { weight: 1, arbitrary: keyedObject(MESH_KEYS, edgy) },
  { weight: 1, arbitrary: keyedObject(HTTP_KEYS, edgy) },
  { weight: 1, arbitrary: keyedObject(['level', 'format', 'dir', 'fsync', 'compactEvery', 'script', 'clients', 'type'], edgy) },
  { weight: 1, arbitrary: fc.array(keyedObject(['script', 'clients', 'type'], edgy), { maxLength: 3 }) },
);

/** resolveConfig's contract: a config, or a TetherError ERR_BAD_CONFIG; any other throw fails the property. */
function configOrBadConfig(raw: unknown): boolean {
  try {
    const c = resolveConfig(raw, 'fuzz.json', '/base');
    return c.baseDir === '/base';
  } catch (e) {
    if (e instanceof TetherError && e.code === 'ERR_BAD_CONFIG') return true;
    throw e;
  }
}

test('resolveConfig: any JSON value gives a config or ERR_BAD_CONFIG, never another exception', (t) => {
  fc.assert(fc.property(fc.jsonValue(), configOrBadConfig), run(1000));
  t.pass();
});

test('resolveConfig: objects of the real keys with arbitrary values give a config or ERR_BAD_CONFIG', (t) => {
  // The keys read from CHECKS, plus whatever CONFIG_DEFAULTS has grown since, so new keys get fuzzed too.
  const keys = [...new Set([...CONFIG_KEYS, ...Object.keys(CONFIG_DEFAULTS)])];
  const raw = fc.array(fc.tuple(fc.constantFrom(...keys, '$schema', 'comment', 'unknownKey'), sectionValue), { maxLength: 8 }).map(objectOf);
  fc.assert(fc.property(raw, configOrBadConfig), run(2000));
  t.pass();
});

// Regression: found by this property. Keys naming Object.prototype members (`__proto__`,
// `hasOwnProperty`…) used to crash the loader with a TypeError; the tables are now read
// with Object.hasOwn.
test('resolveConfig: keys named like Object.prototype members give ERR_BAD_CONFIG, not a TypeError', (t) => {
  const protoKeyed = (keys: string[]) => fc.array(fc.tuple(fc.constantFrom(...keys), edgy), { minLength: 1, maxLength: 3 }).map(objectOf);
  const raw = fc.oneof(
    protoKeyed(PROTO_KEYS),
    protoKeyed(PROTO_KEYS).map((o) => ({ http: o })),
    protoKeyed(PROTO_KEYS).map((o) => ({ mesh: { path: '/dev/ttyUSB0', ...o } })),
  );
  fc.assert(fc.property(raw, configOrBadConfig), run(200));
  t.pass();
});

const LEVELS = ['debug', 'info', 'warn', 'error', 'silent'];

// Regression: found by this property. An explicit null level or format used to be accepted
// and kept (`{"log": {"level": null}}`).
test('resolveConfig: an accepted "log" section always has a real level and format', (t) => {
  const raw = fc
    .array(fc.tuple(fc.constantFrom('level', 'format'), fc.constantFrom<unknown>(null, ...LEVELS, 'pretty', 'json')), { maxLength: 2 })
    .map((e) => ({ log: objectOf(e) }));
  fc.assert(
    fc.property(raw, (r) => {
      let c: TetherConfig;
      try {
        c = resolveConfig(r);
      } catch {
        return true;
      }
      return LEVELS.includes(c.log.level) && (c.log.format === 'pretty' || c.log.format === 'json');
    }),
    run(200),
  );
  t.pass();
});

test('resolveConfig: a valid config round-trips every value it was given and defaults the rest', (t) => {
  const nonEmpty = fc.string({ minLength: 1, maxLength: 12 });
  const ids = fc.array(nonEmpty.filter((s) => !s.includes('\n')), { maxLength: 4 });
  const int = (min: number, max: number) => fc.integer({ min, max });
  const valid = fc.record(
    {
      host: nonEmpty,
      server: nonEmpty,
      port: int(0, 65535),
      timeout: int(40, 3_600_000),
      settleDelay: int(0, 60_000),
      maxLineLength: int(8, 64 * 1024 * 1024),
      maxIdLength: int(1, 1024 * 1024),
      idTimeout: fc.option(int(1, 3_600_000), { nil: null }),
      rxBuffer: int(1, 1_000_000),
      maxQueuedWrites: int(1, 1_000_000),
      window: int(1, 100),
      clients: ids,
      allow: fc.option(ids, { nil: null }),
      duplicateId: fc.constantFrom('ignore-new' as const, 'replace-old' as const),
      apps: fc.array(
        fc.record(
          { script: fc.string({ maxLength: 10 }), clients: fc.oneof(ids, fc.constant('*' as const)), type: nonEmpty },
          { requiredKeys: ['script'] },
        ),
        { maxLength: 3 },
      ),
      types: fc.dictionary(fc.string({ maxLength: 8 }), ids, { maxKeys: 3 }),
      mesh: fc.option(
        fc.record(
          {
            path: nonEmpty,
            baudRate: int(50, 4_000_000),
            dataBits: fc.constantFrom(5, 6, 7, 8),
            stopBits: fc.constantFrom(1, 1.5, 2),
            parity: fc.constantFrom('none', 'even', 'odd', 'mark', 'space'),
            rtscts: fc.boolean(),
            maxFrame: int(16, 1 << 20),
            send: fc.constantFrom('SEND-', 'SENDI'),
            commandTimeout: int(10, 600_000),
            maxOutstanding: int(1, 100_000),
            reopenMin: int(10, 600_000),
            reopenMax: int(10, 3_600_000),
            quarantine: int(0, 3_600_000),
            dataTypes: fc.string({ maxLength: 10 }),
          },
          { requiredKeys: ['path'] },
        ),
        { nil: null },
      ),
      persist: fc.oneof(fc.constant(null), nonEmpty, fc.record({ dir: fc.string({ maxLength: 8 }), fsync: fc.boolean(), compactEvery: fc.nat() }, { requiredKeys: ['dir'] })),
      log: fc.record({ level: fc.constantFrom('debug', 'info', 'warn', 'error', 'silent'), format: fc.constantFrom('pretty', 'json') }, { requiredKeys: [] }),
      http: fc.option(
        fc.record({ host: nonEmpty, port: int(0, 65535), token: fc.option(nonEmpty.filter((s) => !/\s/.test(s)), { nil: null }) }, { requiredKeys: [] }),
        { nil: null },
      ),
      comment: fc.jsonValue({ maxDepth: 1 }),
    },
    { requiredKeys: [] },
  );
  fc.assert(
    fc.property(valid, (given) => {
      const raw = JSON.parse(JSON.stringify(given)) as Record<string, unknown>; // as loadConfig would see it
      const c = resolveConfig(raw, 'fuzz.json', '/base') as unknown as Record<string, unknown>;
      const same = (a: unknown, b: unknown) => JSON.stringify(a) === JSON.stringify(b);
      for (const key of CONFIG_KEYS) {
        const want = key in raw ? raw[key] : (CONFIG_DEFAULTS as Record<string, unknown>)[key];
        if (key === 'log') {
          if (!same(c.log, { ...CONFIG_DEFAULTS.log, ...(raw.log as object) })) return false;
        } else if (key === 'http') {
          if (!same(c.http, raw.http === null ? null : { ...HTTP_CONFIG_DEFAULTS, ...(raw.http as object) })) return false;
        } else if (key === 'idTimeout') {
          if (c.idTimeout !== ((raw.idTimeout as number | null | undefined) ?? c.timeout)) return false;
        } else if (!same(c[key], want)) return false;
      }
      return c.baseDir === '/base';
    }),
    run(500),
  );
  t.pass();
});

// ---- 6. HTTP bodies and queries ---------------------------------------------------

/** Returns normally or throws an HttpProblem 400; any other throw fails the property. */
function okOr400(f: () => unknown): boolean {
  try {
    f();
    return true;
  } catch (e) {
    if (e instanceof HttpProblem && e.status === 400) return true;
    throw e;
  }
}

const queryValue = fc.oneof(
  fc.string({ maxLength: 8 }),
  fc.constantFrom('', 'up', 'down', 'asc', 'desc', ...SORT_FIELDS, '0', '-1', '1e400', 'NaN', 'Infinity', '-Infinity', '0x10', ' 12 ', '1.5', '9007199254740993'),
  fc.integer().map(String),
  fc.double().map(String),
);
const params = (keys: string[]) =>
  fc
    .array(fc.tuple(fc.oneof({ weight: 4, arbitrary: fc.constantFrom(...keys) }, { weight: 1, arbitrary: fc.string({ maxLength: 5 }) }), queryValue), { maxLength: 6 })
    .map((pairs) => new URLSearchParams(pairs));
/** The same, as a raw query string (so percent-escapes, `+`, `&&` and `=` in odd places are exercised too). */
const rawQuery = fc.string({ unit: fc.constantFrom('t', 'y', 'p', 'e', 'q', 's', 'o', 'r', 'f', 'm', '=', '&', '%', '2', '0', '+', 'u', 'd', 'x', 'é', '%C3', '%A9'), maxLength: 30 }).map((s) => new URLSearchParams(s));

test('validate.listQuery: any query string gives a filter or a 400, never another exception', (t) => {
  fc.assert(
    fc.property(fc.oneof(params(['type', 'status', 'q', 'sort', 'dir']), rawQuery), (p) =>
      okOr400(() => {
        const f = validate.listQuery(p);
        if (f.status !== null && f.status !== 'up' && f.status !== 'down') throw new Error(`bad status ${f.status}`);
        if (!SORT_FIELDS.includes(f.sort) || (f.dir !== 'asc' && f.dir !== 'desc')) throw new Error(`bad sort ${f.sort} ${f.dir}`);
      }),
    ),
    run(2000),
  );
  t.pass();
});

test('validate.listQuery: each valid parameter given once comes back in the filter', (t) => {
  const valid = fc.record(
    {
      type: fc.string({ minLength: 1, maxLength: 8 }),
      status: fc.constantFrom('up' as const, 'down' as const),
      q: fc.string({ maxLength: 8 }),
      sort: fc.constantFrom(...SORT_FIELDS),
      dir: fc.constantFrom('asc' as const, 'desc' as const),
    },
    { requiredKeys: [] },
  );
  fc.assert(
    fc.property(valid, (v) => {
      const f = validate.listQuery(new URLSearchParams(v));
      return JSON.stringify(f) === JSON.stringify({ ...DEFAULT_FILTER, ...v });
    }),
    run(1000),
  );
  t.pass();
});

test('validate.timeRange: any query string gives a finite-or-open range or a 400', (t) => {
  fc.assert(
    fc.property(fc.oneof(params(['from', 'to']), rawQuery), (p) =>
      okOr400(() => {
        const { from, to } = validate.timeRange(p);
        if (Number.isNaN(from) || Number.isNaN(to) || from > to) throw new Error(`bad range ${from}..${to}`);
      }),
    ),
    run(2000),
  );
  t.pass();
});

const bodyValue = fc.oneof(
  { weight: 3, arbitrary: fc.jsonValue({ maxDepth: 2 }) },
  {
    weight: 2,
    arbitrary: fc.constantFrom<unknown>('', '\n', 'x', 'x\n', 'x\n\n', 'a\nb', '\r\n', 0, 1, 1.5, -1, 600_000, 600_001, true, false, null, 'lamp', [], {}),
  },
  { weight: 1, arbitrary: fc.string({ maxLength: 300 }) },
);
const sendKeys = ['line', 'type', 'timeout', 'accepted'];

test('validate.sendBody: any JSON body gives a send or a 400, never another exception', (t) => {
  const body = fc.oneof(
    fc.jsonValue(),
    fc.array(fc.tuple(fc.constantFrom(...sendKeys, ...PROTO_KEYS, 'other'), bodyValue), { maxLength: 5 }).map(objectOf),
  );
  fc.assert(
    fc.property(body, fc.boolean(), fc.integer({ min: 3, max: 300 }), (b, withType, maxLineLength) =>
      okOr400(() => {
        const r = validate.sendBody(b, withType, maxLineLength);
        if (r.line.length === 0 || r.line.includes('\n') || Buffer.byteLength(r.line) + 2 > maxLineLength) throw new Error(`accepted a bad line ${JSON.stringify(r.line)}`);
      }),
    ),
    run(3000),
  );
  t.pass();
});

test('validate.sendBody: a valid body comes back with its line (minus one trailing \\n) unchanged', (t) => {
  const valid = fc
    .record(
      {
        text: fc.string({ unit: 'grapheme', minLength: 1, maxLength: 40 }).filter((s) => !s.includes('\n')),
        nl: fc.boolean(),
        type: fc.string({ minLength: 1, maxLength: 8 }),
        timeout: fc.integer({ min: 1, max: SEND_TIMEOUT.max }),
        accepted: fc.boolean(),
      },
      { requiredKeys: ['text', 'nl'] },
    )
    .chain((v) => fc.tuple(fc.constant(v), fc.boolean(), fc.integer({ min: Buffer.byteLength(v.text) + 2, max: Buffer.byteLength(v.text) + 50 })));
  fc.assert(
    fc.property(valid, ([v, withType, maxLineLength]) => {
      if (!withType) delete v.type;
      const { text: line, nl, ...rest } = v;
      const body = JSON.parse(JSON.stringify({ line: nl ? line + '\n' : line, ...rest })) as unknown;
      const r = validate.sendBody(body, withType, maxLineLength);
      return (
        r.line === line &&
        r.type === v.type &&
        r.timeout === (v.timeout ?? SEND_TIMEOUT.default) &&
        r.accepted === (v.accepted === true)
      );
    }),
    run(1000),
  );
  t.pass();
});

test('validate.wsMessage: any JSON message gives FILT/SEL or a 400, never another exception', (t) => {
  const msg = fc.oneof(
    fc.jsonValue(),
    fc
      .tuple(
        fc.constantFrom<unknown>('FILT', 'SEL', 'filt', '', null, 1, undefined),
        fc.array(fc.tuple(fc.constantFrom('id', 'type', 'status', 'q', 'sort', 'dir', ...PROTO_KEYS, 'x'), fc.oneof(bodyValue, fc.constantFrom<unknown>('up', 'down', 'asc', 'desc', ...SORT_FIELDS))), { maxLength: 4 }),
      )
      .map(([t, entries]) => objectOf(t === undefined ? entries : [['t', t], ...entries])),
  );
  const current = fc.record({
    type: fc.option(fc.string({ maxLength: 5 }), { nil: null }),
    status: fc.constantFrom(null, 'up' as const, 'down' as const),
    q: fc.string({ maxLength: 5 }),
    sort: fc.constantFrom(...SORT_FIELDS),
    dir: fc.constantFrom('asc' as const, 'desc' as const),
  });
  fc.assert(
    fc.property(msg, current, (m, f) =>
      okOr400(() => {
        const r = validate.wsMessage(m, f);
        if (r.t === 'SEL' && r.id !== null && (typeof r.id !== 'string' || r.id === '')) throw new Error(`bad SEL id ${String(r.id)}`);
        if (r.t === 'FILT' && (!SORT_FIELDS.includes(r.filter.sort) || typeof r.filter.q !== 'string')) throw new Error('bad filter');
      }),
    ),
    run(3000),
  );
  t.pass();
});

// ---- 7. end to end: arbitrary bytes at a real line server --------------------------

function connectRaw(port: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ host: '127.0.0.1', port });
    s.once('error', reject);
    s.once('connect', () => {
      s.off('error', reject);
      s.on('error', () => {}); // the server may cut a hostile socket at any time
      s.on('data', () => {}); // read (and drop) whatever it sends, so closing never resets
      resolve(s);
    });
  });
}

/** Resolves when written (true) or when the socket has failed (false). */
function writeRaw(s: net.Socket, data: Buffer): Promise<boolean> {
  if (s.destroyed) return Promise.resolve(false);
  return new Promise((resolve) => s.write(data, (err) => resolve(!err)));
}

/** Pieces of protocol mixed into the random bytes, so the fuzz gets past the ID line and the hex check. */
const wirePiece = fc.oneof(
  { weight: 3, arbitrary: fc.uint8Array({ maxLength: 120 }).map((a) => Buffer.from(a)) },
  { weight: 2, arbitrary: bytes(60) },
  {
    weight: 2,
    arbitrary: fc
      .constantFrom('\n', '00hello\n', '01\n', 'ff\n', 'zz\n', '0\n', '7fé\n', '00\n', '00hello\n', '\n\n\n', 'fuzz-x##lamp##{"a":1}\n', 'x##\n', '##t\n', 'a##t##[1]\n')
      .map((s) => Buffer.from(s)),
  },
  { weight: 1, arbitrary: fc.constantFrom(Buffer.from([0xc3]), Buffer.from([0xff, 0xfe, 0x0a]), Buffer.alloc(300, 0x41)) },
);

test.serial('line server: arbitrary bytes on fresh sockets leave it serving a normal client', async (t) => {
  // maxStrikes 0: every run is junk from 127.0.0.1, and this property is about the parsers, not address blocking.
  const server = await Server.listen({ host: '127.0.0.1', port: 0, logger: silentLogger, timeout: 1000, maxStrikes: 0 });
  t.teardown(() => server.close());
  const sockets = new Set<net.Socket>();
  t.teardown(() => sockets.forEach((s) => s.destroy()));

  let n = 0;
  const helloIds: string[] = [];
  await fc.assert(
    fc.asyncProperty(fc.boolean(), fc.array(wirePiece, { maxLength: 8 }), cuts, async (hello, pieces, cutPoints) => {
      const id = `fuzz-${n++}`;
      const s = await connectRaw(server.port);
      sockets.add(s);
      const closed = new Promise<void>((resolve) => s.once('close', () => resolve()));
      if (hello) {
        helloIds.push(id);
        await writeRaw(s, Buffer.from(id + '\n'));
      }
      for (const chunk of splitAt(Buffer.concat(pieces), cutPoints)) if (!(await writeRaw(s, chunk))) break;
      s.end();
      // The server closes its side when it sees our FIN (or cuts the link on timeout): bounded, not a sleep.
      await within(closed, 10_000, `socket ${id} to close`);
      sockets.delete(s);
    }),
    run(30),
  );
  t.log(`${n} hostile sockets; ${helloIds.length} began with an ID line; handshakes ${JSON.stringify(server.handshakes)}`);

  await eventually(() => server.pendingHandshakes === 0, 5000, 'no handshakes left pending');
  t.is(server.pendingHandshakes, 0);
  for (const id of helloIds) t.truthy(server.get(id), `a Connection exists for ${id}`);

  const client = new Client({ id: 'fuzz-good-client', host: '127.0.0.1', port: server.port, timeout: 1000 });
  t.teardown(() => client.close());
  await within(client.connect(), 5000, 'the good client to connect');
  const conn = await within(server.clientConn('fuzz-good-client'), 5000, 'its Connection');
  await within(client.write('hello from the device', { qos: true }), 5000, 'the device write to be ACKed');
  t.is(await within(conn.readline(), 5000, 'the server to read'), 'hello from the device\n');
  await within(conn.write('hello from the server', { qos: true }), 5000, 'the server write to be ACKed');
  t.is(await within(client.readline(), 5000, 'the device to read'), 'hello from the server\n');
  t.true(client.isUp && conn.isUp, 'the good link is up');
  t.is(server.pendingHandshakes, 0);
});

// ---- the ID line and device secrets ---------------------------------------------------

test('parseIdLine: any line gives an ID (without "@" or "##") or an error, never an exception; id@secret##type round-trips', async (t) => {
  fc.assert(
    fc.property(fc.string({ unit: 'grapheme', maxLength: 80 }), (line) => {
      const r = parseIdLine(line);
      if ('error' in r) return typeof r.error === 'string' && r.error.length > 0;
      return r.id.length > 0 && !r.id.includes('@') && !r.id.includes('##');
    }),
    run(3000),
  );
  const part = fc.stringMatching(/^[A-Za-z0-9_.:-]{1,20}$/);
  fc.assert(
    fc.property(part, fc.stringMatching(/^[A-Za-z0-9_-]{8,40}$/), fc.option(part, { nil: undefined }), (id, secret, type) => {
      const line = `${id}@${secret}${type ? `##${type}` : ''}`;
      const r = parseIdLine(line);
      return !('error' in r) && r.id === id && r.secret === secret && r.type === type;
    }),
    run(1000),
  );
  const stored = hashSecret('the-right-secret');
  await fc.assert(
    fc.asyncProperty(fc.string({ maxLength: 140 }), fc.string({ maxLength: 80 }), async (secret, junkHash) => {
      // Any secret or stored value: a boolean, never an exception; only the right secret matches.
      const ok = await verifySecret(secret, stored);
      const junk = await verifySecret(secret, junkHash);
      return ok === (secret === 'the-right-secret') && junk === false;
    }),
    run(500),
  );
  t.pass();
});
