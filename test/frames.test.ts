/**
 * Unit tests of src/protocol/frames.ts (PROTOCOL.md 2.1-2.3): the UART framing
 * of the mesh root (escapes, streaming decoder, drops and their counters) and
 * the root <-> server frame bodies. Pure code, no ports, no timers.
 *
 * Randomised tests print their seed on failure; replay with TETHER_SEED=<seed>.
 */
import test from 'ava';
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
import { prng } from './helpers/prng';

// ---- helpers ----------------------------------------------------------------

/** Seed from TETHER_SEED (to replay a failure) or fresh each run. */
function pickSeed(): number {
  const env = process.env.TETHER_SEED;
  return env !== undefined ? Number(env) >>> 0 : (Math.random() * 2 ** 32) >>> 0;
}

const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');
const B = (...bytes: number[]) => Buffer.from(bytes);
const cat = (...parts: Uint8Array[]) => Buffer.concat(parts);

interface Run {
  frames: string[];
  drops: FrameDropReason[];
  stats: FrameDecoder['stats'];
}

/** Feeds `chunks` to a (new or given) decoder; frames as hex, drops in order, a copy of the stats. */
function run(chunks: Uint8Array[], dec: FrameDecoder = new FrameDecoder()): Run {
  const frames: string[] = [];
  const drops: FrameDropReason[] = [];
  for (const c of chunks) dec.push(c, (f) => frames.push(hex(f)), (why) => drops.push(why));
  return { frames, drops, stats: { ...dec.stats } };
}

/** Private buffer of the decoder, to check it never grows past the limit. */
const internalBuf = (dec: FrameDecoder) => (dec as unknown as { buf: Buffer; len: number }).buf;
const internalLen = (dec: FrameDecoder) => (dec as unknown as { buf: Buffer; len: number }).len;

/** Random body, biased towards the special bytes 0xFA..0xFF. */
function randomBody(rnd: () => number, maxLen: number): Buffer {
  const len = Math.floor(rnd() * (maxLen + 1));
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = rnd() < 0.3 ? 0xfa + Math.floor(rnd() * 6) : Math.floor(rnd() * 256);
  return b;
}

/** Random chunking of `stream` (chunk sizes 1..maxChunk). */
function randomChunks(rnd: () => number, stream: Buffer, maxChunk: number): Buffer[] {
  const chunks: Buffer[] = [];
  for (let at = 0; at < stream.length; ) {
    const size = 1 + Math.floor(rnd() * maxChunk);
    chunks.push(stream.subarray(at, at + size));
    at += size;
  }
  return chunks;
}

/** True if `want` appears in `got` as a subsequence (in order, gaps allowed). */
function isSubsequence(want: string[], got: string[]): boolean {
  let i = 0;
  for (const g of got) if (i < want.length && g === want[i]) i++;
  return i === want.length;
}

const count = (buf: Uint8Array, byte: number) => buf.reduce((n, b) => n + (b === byte ? 1 : 0), 0);

// ---- encodeFrame: escapes ----------------------------------------------------

test('framing constants are FF start, FE end, FA escape', (t) => {
  t.is(FRAME_START, 0xff);
  t.is(FRAME_END, 0xfe);
  t.is(FRAME_ESC, 0xfa);
});

test('encodeFrame: each byte 0xFA..0xFF is sent as FA then b^FA', (t) => {
  const table: Array<[number, number[]]> = [
    [0xff, [0xfa, 0x05]],
    [0xfe, [0xfa, 0x04]],
    [0xfd, [0xfa, 0x07]],
    [0xfc, [0xfa, 0x06]],
    [0xfb, [0xfa, 0x01]],
    [0xfa, [0xfa, 0x00]],
  ];
  for (const [b, esc] of table) {
    t.is(hex(encodeFrame(B(b))), hex(B(0xff, ...esc, 0xfe)), `byte ${b.toString(16)}`);
    t.is(esc[1], b ^ 0xfa);
  }
});

test('encodeFrame: every byte below 0xFA goes through untouched', (t) => {
  for (let b = 0; b < 0xfa; b++) t.is(hex(encodeFrame(B(b))), hex(B(0xff, b, 0xfe)), `byte ${b}`);
  const all = Buffer.from(Array.from({ length: 0xfa }, (_, i) => i));
  t.is(hex(encodeFrame(all)), hex(cat(B(0xff), all, B(0xfe))));
});

test('encodeFrame: empty body is FF FE; mixed body is escaped byte by byte', (t) => {
  t.is(hex(encodeFrame(Buffer.alloc(0))), 'fffe');
  t.is(hex(encodeFrame(new Uint8Array(0))), 'fffe');
  t.is(
    hex(encodeFrame(B(0x00, 0xfa, 0x41, 0xff, 0xfe, 0xf9, 0xfb, 0xfc, 0xfd))),
    hex(B(0xff, 0x00, 0xfa, 0x00, 0x41, 0xfa, 0x05, 0xfa, 0x04, 0xf9, 0xfa, 0x01, 0xfa, 0x06, 0xfa, 0x07, 0xfe)),
  );
  // A Uint8Array that is not a Buffer works too.
  t.is(hex(encodeFrame(new Uint8Array([0xff, 1]))), 'fffa0501fe');
});

/** What can follow an escape byte: b ^ 0xFA for b in 0xFA..0xFF. */
const ESCAPED = new Set([0x00, 0x01, 0x06, 0x07, 0x04, 0x05]);

test('encodeFrame: output has FF only first, FE only last, and no special byte after an escape (random bodies)', (t) => {
  const seed = pickSeed();
  const rnd = prng(seed);
  for (let round = 0; round < 500; round++) {
    const body = randomBody(rnd, 64);
    const f = encodeFrame(body);
    const inner = f.subarray(1, f.length - 1);
    const specials = body.reduce((n, b) => n + (b >= 0xfa ? 1 : 0), 0);
    const ok =
      f[0] === 0xff &&
      f[f.length - 1] === 0xfe &&
      count(inner, 0xff) === 0 &&
      count(inner, 0xfe) === 0 &&
      f.length === body.length + specials + 2 &&
      inner.every((b, i) => b !== 0xfa || (i + 1 < inner.length && ESCAPED.has(inner[i + 1])));
    if (!ok) {
      t.fail(`bad encoding of ${hex(body)}: ${hex(f)} (seed ${seed}, round ${round}); replay with TETHER_SEED=${seed}`);
      return;
    }
  }
  t.pass();
});

// ---- FrameDecoder: round trips --------------------------------------------------

test('decode(encode(x)) == x for all 256 single bytes, one frame each', (t) => {
  for (let b = 0; b < 256; b++) {
    const r = run([encodeFrame(B(b))]);
    t.deepEqual(r.frames, [hex(B(b))], `byte ${b}`);
    t.deepEqual(r.drops, []);
    t.is(r.stats.frames, 1);
  }
});

test('all 256 single-byte frames in one stream, and all 256 bytes in one frame', (t) => {
  const bodies = Array.from({ length: 256 }, (_, b) => B(b));
  const r = run([cat(...bodies.map(encodeFrame))]);
  t.deepEqual(r.frames, bodies.map(hex));
  t.deepEqual(r.stats, { frames: 256, noiseBytes: 0, restarted: 0, oversized: 0, badEscape: 0 });

  const all = Buffer.from(Array.from({ length: 256 }, (_, i) => i));
  t.deepEqual(run([encodeFrame(all)]).frames, [hex(all)]);
  const rev = Buffer.from(all).reverse();
  t.deepEqual(run([encodeFrame(rev)]).frames, [hex(rev)]);
});

test('decoder turns FA b into b^FA for every b that is not FA/FE/FF', (t) => {
  // The canonical escapes (FA 00..05) and also the non-canonical ones: the spec
  // says the decoder XORs whatever follows the escape byte.
  for (let b = 0; b < 256; b++) {
    if (b === 0xfa || b === 0xfe || b === 0xff) continue;
    const r = run([B(0xff, 0x41, 0xfa, b, 0x42, 0xfe)]);
    t.deepEqual(r.frames, [hex(B(0x41, b ^ 0xfa, 0x42))], `FA ${b.toString(16)}`);
    t.deepEqual(r.drops, []);
  }
});

test('seeded random bodies round-trip, alone and as one stream', (t) => {
  const seed = pickSeed();
  const rnd = prng(seed);
  for (let round = 0; round < 200; round++) {
    const bodies = Array.from({ length: 1 + Math.floor(rnd() * 10) }, () => randomBody(rnd, 300));
    for (const body of bodies) {
      const got = run([encodeFrame(body)]).frames;
      if (got.length !== 1 || got[0] !== hex(body)) {
        t.fail(`round trip of ${hex(body)} gave ${JSON.stringify(got)} (seed ${seed}); replay with TETHER_SEED=${seed}`);
        return;
      }
    }
    const r = run([cat(...bodies.map(encodeFrame))]);
    if (JSON.stringify(r.frames) !== JSON.stringify(bodies.map(hex)) || r.drops.length !== 0) {
      t.fail(`stream of ${bodies.length} frames mismatched (seed ${seed}, round ${round}); replay with TETHER_SEED=${seed}`);
      t.deepEqual(r.frames, bodies.map(hex));
      return;
    }
  }
  t.pass();
});

// ---- FrameDecoder: chunking ---------------------------------------------------

test('a short stream gives the same frames, drops and stats for every possible split', (t) => {
  // 15 bytes: noise, an escaped frame, an empty frame, a restarted partial, a frame.
  const stream = B(0x07, 0xff, 0xfa, 0x05, 0x01, 0xfe, 0xff, 0xfe, 0xff, 0x09, 0xff, 0xfa, 0x00, 0xfe, 0x33);
  const whole = run([stream]);
  t.deepEqual(whole.frames, ['ff01', '', 'fa']);
  t.deepEqual(whole.drops, ['restarted']);
  t.deepEqual(whole.stats, { frames: 3, noiseBytes: 2, restarted: 1, oversized: 0, badEscape: 0 });
  const want = JSON.stringify(whole);
  const cuts = stream.length - 1;
  // Each of the 2^14 subsets of cut positions is one way to split the stream.
  for (let mask = 0; mask < 1 << cuts; mask++) {
    const chunks: Buffer[] = [];
    let from = 0;
    for (let i = 0; i < cuts; i++) {
      if (mask & (1 << i)) {
        chunks.push(stream.subarray(from, i + 1));
        from = i + 1;
      }
    }
    chunks.push(stream.subarray(from));
    const got = JSON.stringify(run(chunks));
    if (got !== want) {
      t.fail(`split mask ${mask.toString(2)} gave ${got}, want ${want}`);
      return;
    }
  }
  t.pass();
});

test('a long stream: byte by byte, every single cut, every pair of cuts and random chunks agree', (t) => {
  const seed = pickSeed();
  const rnd = prng(seed);
  const parts: Buffer[] = [B(0x00, 0xfe, 0xfa)]; // noise first
  for (let i = 0; i < 12; i++) {
    parts.push(encodeFrame(randomBody(rnd, 20)));
    if (i % 3 === 0) parts.push(B(0x10, 0xfd)); // noise between frames
    if (i % 4 === 1) parts.push(B(0xff, 0x01, 0x02)); // partial frame, restarted
    if (i % 5 === 2) parts.push(B(0xff, 0x01, 0xfa, 0xfe)); // bad escape
  }
  const stream = cat(...parts);
  const want = JSON.stringify(run([stream]));
  const check = (chunks: Buffer[], what: string) => {
    const got = JSON.stringify(run(chunks));
    if (got !== want) {
      t.fail(`${what}: ${got} != ${want} (seed ${seed}); replay with TETHER_SEED=${seed}`);
      return false;
    }
    return true;
  };
  if (!check([...stream].map((b) => B(b)), 'byte by byte')) return;
  if (!check([Buffer.alloc(0), stream, Buffer.alloc(0)], 'with empty chunks')) return;
  for (let i = 0; i <= stream.length; i++) {
    if (!check([stream.subarray(0, i), stream.subarray(i)], `cut at ${i}`)) return;
  }
  for (let i = 0; i <= stream.length; i += 3) {
    for (let j = i; j <= stream.length; j += 2) {
      if (!check([stream.subarray(0, i), stream.subarray(i, j), stream.subarray(j)], `cuts at ${i}, ${j}`)) return;
    }
  }
  for (let round = 0; round < 300; round++) {
    if (!check(randomChunks(rnd, stream, 1 + Math.floor(rnd() * 16)), `random chunks, round ${round}`)) return;
  }
  t.pass();
});

// ---- FrameDecoder: noise, restarts, truncation --------------------------------

test('noise before, between and after frames is skipped and counted', (t) => {
  const stream = cat(
    B(0x01, 0x02, 0xfe, 0xfa, 0xfd), // 5 noise bytes, including FE and FA outside a frame
    encodeFrame(B(0x10)),
    B(0x41, 0x42, 0x43), // 3
    encodeFrame(B(0xff, 0x11)),
    B(0xfe, 0xfe), // 2
  );
  const r = run([stream]);
  t.deepEqual(r.frames, ['10', 'ff11']);
  t.deepEqual(r.drops, [], 'noise is not a dropped frame');
  t.is(r.stats.noiseBytes, 10);
  t.is(r.stats.frames, 2);
});

test('noise only: nothing delivered, every byte counted', (t) => {
  const noise = Buffer.from(Array.from({ length: 0xff }, (_, i) => i)); // 00..FE, no start byte
  const r = run([noise]);
  t.deepEqual(r.frames, []);
  t.deepEqual(r.stats, { frames: 0, noiseBytes: 0xff, restarted: 0, oversized: 0, badEscape: 0 });
});

test('a start byte inside a frame abandons it; the following frame is intact', (t) => {
  let r = run([B(0xff, 0x01, 0x02, 0xff, 0x03, 0xfe)]);
  t.deepEqual(r.frames, ['03']);
  t.deepEqual(r.drops, ['restarted']);
  t.is(r.stats.restarted, 1);
  t.is(r.stats.noiseBytes, 0);

  // A pending escape does not leak into the next frame.
  r = run([B(0xff, 0x01, 0xfa, 0xff, 0x03, 0xfe)]);
  t.deepEqual(r.frames, ['03']);
  t.deepEqual(r.drops, ['restarted']);
  t.is(r.stats.badEscape, 0);

  // Several restarts in a row; an empty partial frame (FF FF) counts too.
  r = run([B(0xff, 0x01, 0xff, 0xff, 0x02, 0x03, 0xff, 0xfa, 0x05, 0xfe)]);
  t.deepEqual(r.frames, ['ff']);
  t.deepEqual(r.drops, ['restarted', 'restarted', 'restarted']);
  t.is(r.stats.restarted, 3);
  t.is(r.stats.frames, 1);
});

test('a frame truncated at the end of one push, then a good frame in the next', (t) => {
  const dec = new FrameDecoder();
  let r = run([B(0xff, 0x01, 0x02, 0xfa)], dec);
  t.deepEqual(r.frames, [], 'nothing yet: the frame is still open');
  t.deepEqual(r.drops, [], 'an open frame is not dropped before the next start byte');
  r = run([encodeFrame(B(0x05, 0xfe))], dec);
  t.deepEqual(r.frames, ['05fe']);
  t.deepEqual(r.drops, ['restarted']);
  t.deepEqual(dec.stats, { frames: 1, noiseBytes: 0, restarted: 1, oversized: 0, badEscape: 0 });
});

test('a frame split across pushes right after its escape byte is decoded', (t) => {
  const dec = new FrameDecoder();
  const got: string[] = [];
  dec.push(B(0xff, 0x01, 0xfa), (f) => got.push(hex(f)));
  dec.push(B(0x05), (f) => got.push(hex(f)));
  dec.push(B(0xfe), (f) => got.push(hex(f)));
  t.deepEqual(got, ['01ff']);
});

// ---- FrameDecoder: size limit ---------------------------------------------------

test('oversized frames: exact limit passes, limit+1 is dropped and counted, next frame intact', (t) => {
  for (const max of [1, 2, 7, 8, 100, 1023, 1024, 1025, 2048, 3000]) {
    const exact = Buffer.alloc(max, 0x41);
    const over = Buffer.alloc(max + 1, 0x42);
    const dec = new FrameDecoder(max);
    const r = run([cat(encodeFrame(exact), encodeFrame(over), encodeFrame(B(0x01)))], dec);
    t.deepEqual(r.frames, [hex(exact), '01'], `max ${max}`);
    t.deepEqual(r.drops, ['oversized'], `max ${max}`);
    t.deepEqual(r.stats, { frames: 2, noiseBytes: 0, restarted: 0, oversized: 1, badEscape: 0 }, `max ${max}`);
  }
});

test('the limit counts decoded bytes, not escaped wire bytes', (t) => {
  const max = 8;
  const exact = Buffer.alloc(max, 0xff); // 16 wire bytes between FF and FE
  const over = Buffer.alloc(max + 1, 0xfa);
  const r = run([cat(encodeFrame(exact), encodeFrame(over), encodeFrame(B(0x02)))], new FrameDecoder(max));
  t.deepEqual(r.frames, [hex(exact), '02']);
  t.deepEqual(r.drops, ['oversized']);
  // Escape byte at the limit, completed in the next push.
  const dec = new FrameDecoder(2);
  const r2 = run([B(0xff, 0x01, 0x02, 0xfa), B(0x05, 0x03, 0xfe), encodeFrame(B(0xfe, 0xff))], dec);
  t.deepEqual(r2.frames, ['feff']);
  t.deepEqual(r2.drops, ['oversized']);
});

test('the default limit is 4096 bytes', (t) => {
  const dec = new FrameDecoder();
  t.is(dec.maxFrame, 4096);
  const r = run([encodeFrame(Buffer.alloc(4096, 7)), encodeFrame(Buffer.alloc(4097, 7)), encodeFrame(B(9))], dec);
  t.deepEqual(r.frames, [hex(Buffer.alloc(4096, 7)), '09']);
  t.is(r.stats.oversized, 1);
});

test('after an oversized frame the decoder recovers at the next start byte', (t) => {
  // Cut short by a start byte: the oversized frame is counted once, not also as restarted.
  let r = run([cat(B(0xff), Buffer.alloc(10, 1), B(0xff, 0x05, 0xfe))], new FrameDecoder(4));
  t.deepEqual(r.frames, ['05']);
  t.deepEqual(r.drops, ['oversized']);
  t.is(r.stats.restarted, 0);

  // The rest of an oversized frame (escapes included) is skipped up to its end; noise after it is counted.
  r = run([cat(encodeFrame(Buffer.alloc(10, 0xfb)), B(0x77, 0x78), encodeFrame(B(0x06)))], new FrameDecoder(4));
  t.deepEqual(r.frames, ['06']);
  t.deepEqual(r.drops, ['oversized']);
  t.is(r.stats.noiseBytes, 2);

  // Several oversized frames in a row, in byte-sized chunks.
  const stream = cat(...Array.from({ length: 5 }, () => encodeFrame(Buffer.alloc(6, 0xff))), encodeFrame(B(0x08)));
  r = run([...stream].map((b) => B(b)), new FrameDecoder(5));
  t.deepEqual(r.frames, ['08']);
  t.is(r.stats.oversized, 5);
});

test('the decoder never buffers more than the limit', (t) => {
  for (const max of [1, 3, 1000, 1024, 1500, 2049, 5000]) {
    const dec = new FrameDecoder(max);
    const big = encodeFrame(Buffer.alloc(max * 3 + 10, 0xfc));
    let worst = 0;
    for (let i = 0; i < big.length; i++) {
      dec.push(big.subarray(i, i + 1), () => {});
      worst = Math.max(worst, internalBuf(dec).length, internalLen(dec));
    }
    t.true(worst <= max, `max ${max}: buffered ${worst}`);
    t.is(dec.stats.oversized, 1);
    // And it still delivers a full-size frame afterwards (buffer grown to exactly the limit).
    const full = Buffer.alloc(max, 0x5a);
    const got: Buffer[] = [];
    dec.push(encodeFrame(full), (f) => got.push(f));
    t.is(got.length, 1);
    t.true(got[0].equals(full));
    t.true(internalBuf(dec).length <= max);
  }
});

test('maxFrame must be > 0', (t) => {
  t.throws(() => new FrameDecoder(0), { instanceOf: RangeError, message: /maxFrame/ });
  t.throws(() => new FrameDecoder(-1), { instanceOf: RangeError });
  t.throws(() => new FrameDecoder(Number.NaN), { instanceOf: RangeError });
});

// ---- FrameDecoder: bad escapes, empty frames, callbacks --------------------------

test('an escape followed by FE or FA drops the frame and counts a bad escape', (t) => {
  // FA FE: the end byte ends the (dropped) frame.
  let r = run([cat(B(0xff, 0x01, 0xfa, 0xfe), encodeFrame(B(0x02)))]);
  t.deepEqual(r.frames, ['02']);
  t.deepEqual(r.drops, ['bad-escape']);
  t.is(r.stats.badEscape, 1);
  t.is(r.stats.frames, 1);

  // FA FA: the frame is dropped, the rest of it is never delivered.
  r = run([cat(B(0xff, 0x01, 0xfa, 0xfa, 0x02, 0xfe), encodeFrame(B(0x03)))]);
  t.deepEqual(r.frames, ['03']);
  t.deepEqual(r.drops, ['bad-escape']);
  t.is(r.stats.badEscape, 1);

  // Right at the start of a frame, and split across pushes.
  r = run([B(0xff, 0xfa), B(0xfa), B(0xfe, 0xff, 0xfa), B(0xfe), encodeFrame(B(0x04))]);
  t.deepEqual(r.frames, ['04']);
  t.deepEqual(r.drops, ['bad-escape', 'bad-escape']);
  t.is(r.stats.badEscape, 2);
  t.is(r.stats.restarted, 0);
});

test('an escape followed by a start byte is a restart, not a bad escape', (t) => {
  const r = run([B(0xff, 0x01, 0xfa, 0xff, 0x02, 0xfe)]);
  t.deepEqual(r.frames, ['02']);
  t.deepEqual(r.drops, ['restarted']);
  t.is(r.stats.badEscape, 0);
});

test('the empty frame FF FE is delivered as an empty body', (t) => {
  const r = run([B(0xff, 0xfe, 0xff, 0xfe), encodeFrame(Buffer.alloc(0))]);
  t.deepEqual(r.frames, ['', '', '']);
  t.is(r.stats.frames, 3);
  const dec = new FrameDecoder();
  let body: Buffer | undefined;
  dec.push(B(0xff, 0xfe), (f) => (body = f));
  t.true(Buffer.isBuffer(body));
  t.is(body!.length, 0);
});

test('each delivered body is its own copy', (t) => {
  const dec = new FrameDecoder();
  const got: Buffer[] = [];
  dec.push(cat(encodeFrame(B(1, 2, 3)), encodeFrame(B(4, 5, 6))), (f) => got.push(f));
  t.deepEqual(got.map(hex), ['010203', '040506']);
  got[1][0] = 0x99;
  dec.push(encodeFrame(B(7, 8, 9)), (f) => got.push(f));
  t.deepEqual(got.map(hex), ['010203', '990506', '070809']);
});

test('onDrop is optional: drops are still counted', (t) => {
  const dec = new FrameDecoder(2);
  const got: string[] = [];
  const stream = cat(B(0xff, 1, 0xff), B(0xff, 1, 0xfa, 0xfe), encodeFrame(B(1, 2, 3)), encodeFrame(B(1, 2)));
  t.notThrows(() => dec.push(stream, (f) => got.push(hex(f))));
  t.deepEqual(got, ['0102']);
  t.deepEqual(dec.stats, { frames: 1, noiseBytes: 0, restarted: 2, oversized: 1, badEscape: 1 });
});

// ---- FrameDecoder: properties on junk -----------------------------------------

test('property: random junk never throws, stats stay consistent and chunking does not matter', (t) => {
  const seed = pickSeed();
  const rnd = prng(seed);
  for (let round = 0; round < 500; round++) {
    const junk = randomBody(rnd, 400);
    const max = 1 + Math.floor(rnd() * 40);
    let whole: Run;
    try {
      whole = run([junk], new FrameDecoder(max));
    } catch (e) {
      t.fail(`threw on ${hex(junk)} (max ${max}, seed ${seed}): ${String(e)}; replay with TETHER_SEED=${seed}`);
      return;
    }
    const s = whole.stats;
    const ends = s.frames + s.restarted + s.oversized + s.badEscape;
    const starts = count(junk, 0xff);
    const ok =
      s.frames === whole.frames.length &&
      whole.drops.length === s.restarted + s.oversized + s.badEscape &&
      (ends === starts || ends === starts - 1) && // every start byte opens one frame; the last may still be open
      s.noiseBytes <= junk.length - starts &&
      whole.frames.every((f) => f.length / 2 <= max) &&
      JSON.stringify(run(randomChunks(rnd, junk, 8), new FrameDecoder(max))) === JSON.stringify(whole);
    if (!ok) {
      t.fail(`inconsistent on ${hex(junk)} (max ${max}): ${JSON.stringify(whole)} (seed ${seed}); replay with TETHER_SEED=${seed}`);
      return;
    }
  }
  t.pass();
});

test('property: junk between valid frames never hides a valid frame, and order is kept', (t) => {
  const seed = pickSeed();
  const rnd = prng(seed);
  for (let round = 0; round < 400; round++) {
    const max = 16 + Math.floor(rnd() * 64);
    const valid: Buffer[] = [];
    const parts: Buffer[] = [];
    const n = Math.floor(rnd() * 12);
    for (let i = 0; i < n; i++) {
      if (rnd() < 0.7) parts.push(randomBody(rnd, 50)); // junk: may open frames, escape, end, overflow
      const body = randomBody(rnd, max);
      valid.push(body);
      parts.push(encodeFrame(body));
    }
    if (rnd() < 0.5) parts.push(randomBody(rnd, 50));
    const stream = cat(...parts);
    let got: Run;
    try {
      got = run(randomChunks(rnd, stream, 1 + Math.floor(rnd() * 30)), new FrameDecoder(max));
    } catch (e) {
      t.fail(`threw (seed ${seed}, round ${round}): ${String(e)}; replay with TETHER_SEED=${seed}`);
      return;
    }
    const want = valid.map(hex);
    if (!isSubsequence(want, got.frames)) {
      t.fail(`valid frames lost or reordered (seed ${seed}, round ${round}); replay with TETHER_SEED=${seed}`);
      t.deepEqual(got.frames, want);
      return;
    }
  }
  t.pass();
});

// ---- parseRootBody -------------------------------------------------------------

const uuidA = Buffer.from('00112233445566778899aabbccddeeff', 'hex');
const uuidB = Buffer.from('fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0', 'hex');
const uuidC = Buffer.from('0123456789abcdef0123456789abcdef', 'hex');
const entry = (addr: number, uuid: Buffer) => cat(B(addr >> 8, addr & 0xff), uuid);

test('parseRootBody: a body shorter than addr + opcode is a BodyError', (t) => {
  for (const body of [Buffer.alloc(0), B(0x00), B(0x12, 0x34)]) {
    t.throws(() => parseRootBody(body), { instanceOf: BodyError, message: /shorter than addr \+ opcode/ }, hex(body));
  }
  t.true(new BodyError('x') instanceof Error);
  t.deepEqual(parseRootBody(B(0x12, 0x34, Op.LINE)), { op: 'line', addr: 0x1234, data: Buffer.alloc(0) });
});

test('parseRootBody: the address is big-endian', (t) => {
  for (const [bytes, addr] of [
    [[0x00, 0x00], 0x0000],
    [[0x12, 0x34], 0x1234],
    [[0x34, 0x12], 0x3412],
    [[0x00, 0x01], 0x0001],
    [[0x01, 0x00], 0x0100],
    [[0xff, 0xff], 0xffff],
  ] as Array<[number[], number]>) {
    t.is(parseRootBody(B(...bytes, Op.ROOT_RESET)).addr, addr);
    t.is(parseRootBody(B(...bytes, 0x77)).addr, addr, 'unknown opcodes keep the address too');
    t.is(hex(rootBody(addr, Op.NODE_DOWN).subarray(0, 2)), hex(B(...bytes)));
  }
});

test('parseRootBody: opcode values are those of PROTOCOL.md 2.2', (t) => {
  t.deepEqual({ ...Op }, { LINE: 0, NET_INFO: 1, NODE_UP: 2, ROOT_RESET: 3, NODE_DOWN: 4, RESULT: 5, DATA: 0x44 });
});

test('parseRootBody: LINE carries the node bytes untouched', (t) => {
  const data = Buffer.from('1f0c{"t":1}\n\n\x00\xff', 'latin1');
  const m = parseRootBody(cat(B(0x12, 0x34, 0x00), data));
  t.is(m.op, 'line');
  if (m.op !== 'line') return;
  t.is(m.addr, 0x1234);
  t.is(hex(m.data), hex(data));
  t.is(parseRootBody(B(0, 1, 0)).op, 'line');
});

test('parseRootBody: NET_INFO with 0, 1 and several nodes', (t) => {
  t.deepEqual(parseRootBody(B(0, 0, Op.NET_INFO, 0)), { op: 'net-info', addr: 0, nodes: [] });
  t.deepEqual(parseRootBody(cat(B(0, 0, Op.NET_INFO, 1), entry(0x1234, uuidA))), {
    op: 'net-info',
    addr: 0,
    nodes: [{ addr: 0x1234, uuid: '00112233445566778899aabbccddeeff' }],
  });
  t.deepEqual(parseRootBody(cat(B(0xab, 0xcd, Op.NET_INFO, 3), entry(0x0000, uuidA), entry(0xffff, uuidB), entry(0x0102, uuidC))), {
    op: 'net-info',
    addr: 0xabcd,
    nodes: [
      { addr: 0x0000, uuid: '00112233445566778899aabbccddeeff' },
      { addr: 0xffff, uuid: 'fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0' },
      { addr: 0x0102, uuid: '0123456789abcdef0123456789abcdef' },
    ],
  });
  // The largest count a byte can say.
  const many = Array.from({ length: 255 }, (_, i) => entry(i, uuidC));
  const m = parseRootBody(cat(B(0, 0, Op.NET_INFO, 255), ...many));
  t.is(m.op === 'net-info' ? m.nodes.length : -1, 255);
});

test('parseRootBody: NET_INFO of the wrong length is a BodyError', (t) => {
  const bad = [
    B(0, 0, Op.NET_INFO), // no count
    B(0, 0, Op.NET_INFO, 0, 0x00), // count 0 with a trailing byte
    cat(B(0, 0, Op.NET_INFO, 1), entry(1, uuidA).subarray(0, 17)), // entry cut short
    cat(B(0, 0, Op.NET_INFO, 1), entry(1, uuidA), B(0)), // one byte too many
    cat(B(0, 0, Op.NET_INFO, 2), entry(1, uuidA)), // count says 2, has 1
    cat(B(0, 0, Op.NET_INFO, 1), entry(1, uuidA), entry(2, uuidB)), // count says 1, has 2
  ];
  for (const body of bad) t.throws(() => parseRootBody(body), { instanceOf: BodyError, message: /NET_INFO/ }, hex(body));
});

test('parseRootBody: NODE_UP with a 16-byte UUID; other lengths are BodyErrors', (t) => {
  t.deepEqual(parseRootBody(cat(B(0x00, 0x07, Op.NODE_UP), uuidB)), {
    op: 'node-up',
    addr: 7,
    uuid: 'fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0',
  });
  for (const len of [0, 1, 15, 17, 32]) {
    t.throws(() => parseRootBody(cat(B(0, 7, Op.NODE_UP), Buffer.alloc(len))), { instanceOf: BodyError, message: /NODE_UP.*16/ }, `${len} bytes`);
  }
});

test('parseRootBody: ROOT_RESET and NODE_DOWN', (t) => {
  t.deepEqual(parseRootBody(B(0x00, 0x00, Op.ROOT_RESET)), { op: 'root-reset', addr: 0 });
  t.deepEqual(parseRootBody(B(0x12, 0x34, Op.NODE_DOWN)), { op: 'node-down', addr: 0x1234 });
  t.deepEqual(parseRootBody(B(0xff, 0xff, Op.NODE_DOWN)), { op: 'node-down', addr: 0xffff });
});

test('parseRootBody: RESULT S and F with text', (t) => {
  t.deepEqual(parseRootBody(B(0, 0, Op.RESULT, 0x53)), { op: 'result', addr: 0, ok: true });
  const text = Buffer.from('no route to 0x1234 – retry', 'utf8');
  t.deepEqual(parseRootBody(cat(B(0, 0, Op.RESULT, 0x46, text.length), text)), {
    op: 'result',
    addr: 0,
    ok: false,
    error: 'no route to 0x1234 – retry',
  });
  t.deepEqual(parseRootBody(B(0, 0, Op.RESULT, 0x46, 0)), { op: 'result', addr: 0, ok: false, error: '' });
  const long = Buffer.alloc(255, 0x78);
  t.deepEqual(parseRootBody(cat(B(0, 0, Op.RESULT, 0x46, 255), long)), { op: 'result', addr: 0, ok: false, error: 'x'.repeat(255) });
});

test('parseRootBody: malformed RESULTs are BodyErrors', (t) => {
  const bad = [
    B(0, 0, Op.RESULT), // nothing
    B(0, 0, Op.RESULT, 0x73), // lowercase s
    B(0, 0, Op.RESULT, 0x58), // X
    B(0, 0, Op.RESULT, 0x53, 0x00), // S with trailing byte
    B(0, 0, Op.RESULT, 0x46), // F without len
    B(0, 0, Op.RESULT, 0x46, 3, 0x61, 0x62), // text cut short
    B(0, 0, Op.RESULT, 0x46, 1, 0x61, 0x62), // text longer than len
  ];
  for (const body of bad) t.throws(() => parseRootBody(body), { instanceOf: BodyError, message: /RESULT/ }, hex(body));
});

test('parseRootBody: DATA uses the lengths function', (t) => {
  const table: Record<number, number> = { 1: 1, 2: 2, 7: 4, 9: 0, 200: 8 };
  const lengths = (id: number): number | undefined => table[id];
  t.deepEqual(parseRootBody(B(0, 5, Op.DATA, 0), lengths), { op: 'data', addr: 5, items: [] });
  const m = parseRootBody(B(0x12, 0x34, Op.DATA, 4, 1, 0xaa, 7, 1, 2, 3, 4, 9, 2, 0xff, 0xfe), lengths);
  t.is(m.op, 'data');
  if (m.op !== 'data') return;
  t.is(m.addr, 0x1234);
  t.deepEqual(
    m.items.map((i) => [i.type, hex(i.raw)]),
    [
      [1, 'aa'],
      [7, '01020304'],
      [9, ''],
      [2, 'fffe'],
    ],
  );
  const same = parseRootBody(B(0, 0, Op.DATA, 2, 1, 0x01, 1, 0x02), lengths);
  t.deepEqual(same.op === 'data' ? same.items.map((i) => hex(i.raw)) : [], ['01', '02']);
  t.is(Op.DATA, 0x44);
  t.is(parseRootBody(Buffer.from('\x00\x01D\x00', 'latin1')).op, 'data', "opcode 'D'");
});

test('parseRootBody: malformed DATA bodies are BodyErrors that say what is wrong', (t) => {
  const table: Record<number, number> = { 1: 1, 7: 4 };
  const lengths = (id: number): number | undefined => table[id];
  const cases: Array<[Buffer, RegExp]> = [
    [B(0, 0, Op.DATA), /without a count/],
    [B(0, 0, Op.DATA, 1, 42, 0x00), /unknown type id 42.*data-type table/],
    [B(0, 0, Op.DATA, 1, 7, 1, 2, 3), /type 7 is cut short/],
    [B(0, 0, Op.DATA, 2, 1, 0x05), /says 2 values but ends after 1/],
    [B(0, 0, Op.DATA, 1), /says 1 values but ends after 0/],
    [B(0, 0, Op.DATA, 1, 1, 0x05, 0x06), /1 bytes after its 1 values/],
    [B(0, 0, Op.DATA, 0, 0x01), /1 bytes after its 0 values/],
  ];
  for (const [body, message] of cases) t.throws(() => parseRootBody(body, lengths), { instanceOf: BodyError, message }, hex(body));
  // Without a lengths function every type id is unknown.
  t.throws(() => parseRootBody(B(0, 0, Op.DATA, 1, 1, 0x05)), { instanceOf: BodyError, message: /unknown type id 1/ });
  t.deepEqual(parseRootBody(B(0, 0, Op.DATA, 0)), { op: 'data', addr: 0, items: [] });
});

test('parseRootBody: every other opcode is unknown, with its address and opcode', (t) => {
  const known = new Set<number>(Object.values(Op));
  for (let op = 0; op < 256; op++) {
    if (known.has(op)) continue;
    t.deepEqual(parseRootBody(B(0x12, 0x34, op, 1, 2, 3)), { op: 'unknown', addr: 0x1234, opcode: op });
    t.deepEqual(parseRootBody(B(0xff, 0xff, op)), { op: 'unknown', addr: 0xffff, opcode: op });
  }
});

// ---- command bodies (server -> root) -----------------------------------------

const COMMANDS: RootCommand[] = ['SEND-', 'SENDI', 'BCAST', 'RST-R', 'CLEAN', 'NINFO'];

test('commandBody: command(5 ASCII) | addr(2 BE) | data', (t) => {
  t.is(hex(commandBody('SEND-', 0x1234, Buffer.from('hi'))), hex(cat(Buffer.from('SEND-'), B(0x12, 0x34), Buffer.from('hi'))));
  t.is(hex(commandBody('NINFO', 0)), hex(cat(Buffer.from('NINFO'), B(0, 0))));
  t.is(commandBody('RST-R', 0xffff).length, 7);
  t.is(hex(commandBody('SENDI', 1, new Uint8Array([0xff, 0xfe]))), hex(cat(Buffer.from('SENDI'), B(0, 1, 0xff, 0xfe))));
});

test('commandBody/parseCommandBody round trip for every command', (t) => {
  const payloads = [Buffer.alloc(0), Buffer.from('1f0c{"t":1}\n'), B(0xff, 0xfe, 0xfa, 0x00), Buffer.alloc(300, 0x61)];
  for (const cmd of COMMANDS) {
    for (const addr of [0x0000, 0x0001, 0x1234, 0xfffe, 0xffff]) {
      for (const data of payloads) {
        const body = commandBody(cmd, addr, data);
        const p = parseCommandBody(body);
        t.is(p.cmd, cmd);
        t.is(p.addr, addr);
        t.is(hex(p.data), hex(data));
        // And through the framing.
        const r = run([encodeFrame(body)]);
        t.deepEqual(r.frames, [hex(body)]);
        t.deepEqual(parseCommandBody(Buffer.from(r.frames[0], 'hex')), p);
      }
    }
  }
});

test('parseCommandBody: shorter than command + addr is a BodyError', (t) => {
  for (let n = 0; n < 7; n++) {
    t.throws(() => parseCommandBody(Buffer.from('SEND-\x00\x01'.slice(0, n), 'latin1')), { instanceOf: BodyError, message: /shorter than command \+ addr/ });
  }
  t.deepEqual(parseCommandBody(Buffer.from('BCAST\x00\x00', 'latin1')), { cmd: 'BCAST', addr: 0, data: Buffer.alloc(0) });
});

test('commandBody: an address outside 0..0xFFFF throws', (t) => {
  t.throws(() => commandBody('SEND-', 0x10000));
  t.throws(() => commandBody('SEND-', -1));
  t.throws(() => rootBody(0x10000, Op.LINE));
});

// ---- root bodies (the emulator's side) ---------------------------------------

test('rootBody round-trips through parseRootBody for every opcode', (t) => {
  for (const addr of [0x0000, 0x1234, 0xffff]) {
    t.deepEqual(parseRootBody(rootBody(addr, Op.LINE, Buffer.from('ab\n'))), { op: 'line', addr, data: Buffer.from('ab\n') });
    t.deepEqual(parseRootBody(rootBody(addr, Op.LINE)), { op: 'line', addr, data: Buffer.alloc(0) });
    t.deepEqual(parseRootBody(rootBody(addr, Op.NET_INFO, cat(B(2), entry(1, uuidA), entry(2, uuidB)))), {
      op: 'net-info',
      addr,
      nodes: [
        { addr: 1, uuid: uuidA.toString('hex') },
        { addr: 2, uuid: uuidB.toString('hex') },
      ],
    });
    t.deepEqual(parseRootBody(rootBody(addr, Op.NODE_UP, uuidC)), { op: 'node-up', addr, uuid: uuidC.toString('hex') });
    t.deepEqual(parseRootBody(rootBody(addr, Op.ROOT_RESET)), { op: 'root-reset', addr });
    t.deepEqual(parseRootBody(rootBody(addr, Op.NODE_DOWN)), { op: 'node-down', addr });
    t.deepEqual(parseRootBody(rootBody(addr, Op.RESULT, Buffer.from('S'))), { op: 'result', addr, ok: true });
    const data = parseRootBody(rootBody(addr, Op.DATA, B(1, 3, 0x0a, 0x0b)), (id) => (id === 3 ? 2 : undefined));
    t.deepEqual(data.op === 'data' ? [data.addr, data.items.map((i) => [i.type, hex(i.raw)])] : [], [addr, [[3, '0a0b']]]);
    t.deepEqual(parseRootBody(rootBody(addr, 0x99)), { op: 'unknown', addr, opcode: 0x99 });
    // Through the framing as well.
    const body = rootBody(addr, Op.LINE, B(0xff, 0xfa, 0xfe));
    t.deepEqual(run([encodeFrame(body)]).frames, [hex(body)]);
  }
});

test('resultBody round-trips through parseRootBody', (t) => {
  t.is(hex(resultBody(true)), hex(B(0, 0, Op.RESULT, 0x53)));
  t.deepEqual(parseRootBody(resultBody(true)), { op: 'result', addr: 0, ok: true });
  t.deepEqual(parseRootBody(resultBody(true, 'ignored')), { op: 'result', addr: 0, ok: true });
  t.deepEqual(parseRootBody(resultBody(false)), { op: 'result', addr: 0, ok: false, error: '' });
  t.deepEqual(parseRootBody(resultBody(false, 'node 0x1234 unreachable')), { op: 'result', addr: 0, ok: false, error: 'node 0x1234 unreachable' });
  t.deepEqual(parseRootBody(resultBody(false, 'héllo ✓')), { op: 'result', addr: 0, ok: false, error: 'héllo ✓' });
  t.is(hex(resultBody(false, 'ab')), hex(B(0, 0, Op.RESULT, 0x46, 2, 0x61, 0x62)));
  const exact = 'e'.repeat(255);
  t.deepEqual(parseRootBody(resultBody(false, exact)), { op: 'result', addr: 0, ok: false, error: exact });
});

test('resultBody: an F text longer than 255 bytes is truncated to 255', (t) => {
  const body = resultBody(false, 'x'.repeat(300));
  t.is(body.length, 3 + 2 + 255);
  t.is(body[4], 255);
  t.deepEqual(parseRootBody(body), { op: 'result', addr: 0, ok: false, error: 'x'.repeat(255) });
  t.deepEqual(parseRootBody(resultBody(false, 'y'.repeat(256))), { op: 'result', addr: 0, ok: false, error: 'y'.repeat(255) });
});

test('resultBody: truncation never cuts a UTF-8 character in half', (t) => {
  // 254 ASCII bytes then 2-, 3- and 4-byte characters straddling the 255-byte limit.
  for (const tail of ['é', '✓', '😀', 'éé', '✓✓✓']) {
    for (const pad of [251, 252, 253, 254, 255]) {
      const text = 'a'.repeat(pad) + tail;
      const m = parseRootBody(resultBody(false, text));
      if (m.op !== 'result' || m.ok) return t.fail('not an F result');
      const bytes = Buffer.byteLength(m.error, 'utf8');
      t.true(bytes <= 255, `${pad} + ${tail}: ${bytes} bytes`);
      t.false(m.error.includes('\ufffd'), `${pad} + ${tail}: replacement character in ${JSON.stringify(m.error.slice(-4))}`);
      t.true(text.startsWith(m.error), `${pad} + ${tail}: a prefix of the text`);
      t.true(bytes > 255 - 4, `${pad} + ${tail}: keeps as much as fits (${bytes} bytes)`);
    }
  }
});
