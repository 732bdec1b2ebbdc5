/**
 * Unit tests of src/protocol (PROTOCOL.md 1.2 and 1.3): the line splitter, line
 * classification, message ids, the duplicate ring and payload checks. Pure code,
 * no sockets or timers.
 */
import test from 'ava';
import {
  DuplicateRing,
  formatAck,
  formatMessage,
  KEEPALIVE,
  LineSplitter,
  MidGenerator,
  midHex,
  normalizePayload,
  parseLine,
  parseMid,
  payloadProblem,
} from '../src/protocol';
import { prng } from './helpers/prng';

// ---- helpers ----------------------------------------------------------------


/** Seed from TETHER_SEED (to replay a failure) or fresh each run. */
function pickSeed(): number {
  const env = process.env.TETHER_SEED;
  return env !== undefined ? Number(env) >>> 0 : (Math.random() * 2 ** 32) >>> 0;
}

type Ev = { line: string } | { overflow: true };

/** Feeds `chunks` to `sp`, recording events and checking the buffer bound after every push. */
function feed(sp: LineSplitter, chunks: Array<Buffer | string>, events: Ev[] = []): Ev[] {
  for (const c of chunks) {
    const buf = typeof c === 'string' ? Buffer.from(c, 'latin1') : c;
    sp.push(
      buf,
      (line) => events.push({ line: line.toString('latin1') }),
      () => events.push({ overflow: true }),
    );
    if (sp.buffered > sp.maxLength) throw new Error(`splitter buffers ${sp.buffered} bytes > limit ${sp.maxLength}`);
  }
  return events;
}

const L = (line: string): Ev => ({ line });
const OVER: Ev = { overflow: true };

// ---- LineSplitter ---------------------------------------------------------------

test('LineSplitter: a line split across several chunks is delivered whole, once', (t) => {
  const sp = new LineSplitter(100);
  t.deepEqual(feed(sp, ['he', 'll', 'o wor', 'ld']), []);
  t.is(sp.buffered, 11);
  t.deepEqual(feed(sp, ['\n']), [L('hello world')]);
  t.is(sp.buffered, 0);
});

test('LineSplitter: byte-by-byte feeding', (t) => {
  const sp = new LineSplitter(100);
  const text = '00first\n\n01second\nab\n';
  const ev = feed(
    sp,
    [...Buffer.from(text)].map((b) => Buffer.from([b])),
  );
  t.deepEqual(ev, [L('00first'), L(''), L('01second'), L('ab')]);
});

test('LineSplitter: many lines in one chunk, with a tail kept for the next chunk', (t) => {
  const sp = new LineSplitter(100);
  const ev = feed(sp, ['a\nbb\nccc\n\ndddd\nta']);
  t.deepEqual(ev, [L('a'), L('bb'), L('ccc'), L(''), L('dddd')]);
  t.is(sp.buffered, 2);
  feed(sp, ['il\n'], ev);
  t.deepEqual(ev.at(-1), L('tail'));
});

test('LineSplitter: empty lines (keepalives) are delivered as empty buffers', (t) => {
  const sp = new LineSplitter(10);
  const seen: Buffer[] = [];
  sp.push(Buffer.from('\n\n\n'), (l) => seen.push(l), () => t.fail('no overflow expected'));
  t.is(seen.length, 3);
  for (const l of seen) t.is(l.length, 0);
});

test('LineSplitter: a line of exactly the limit is delivered; limit+1 overflows', (t) => {
  const max = 16;
  for (const split of [0, 1, 5, max - 1, max]) {
    const sp = new LineSplitter(max);
    const exact = 'x'.repeat(max);
    const ev = feed(sp, [exact.slice(0, split), exact.slice(split) + '\n']);
    t.deepEqual(ev, [L(exact)], `exact limit, split at ${split}`);
  }
  // Exactly `max` bytes buffered, then the newline alone in the next chunk.
  {
    const sp = new LineSplitter(max);
    const ev = feed(sp, ['y'.repeat(max)]);
    t.is(sp.buffered, max);
    feed(sp, ['\n'], ev);
    t.deepEqual(ev, [L('y'.repeat(max))]);
  }
  for (const split of [0, 1, max, max + 1]) {
    const sp = new LineSplitter(max);
    const over = 'z'.repeat(max + 1);
    const ev = feed(sp, [over.slice(0, split), over.slice(split) + '\nnext\n']);
    t.deepEqual(ev, [OVER, L('next')], `limit+1, split at ${split}`);
  }
});

test('LineSplitter: an oversized line is reported once, as soon as it crosses the limit, then skipped through its newline', (t) => {
  const max = 8;
  const sp = new LineSplitter(max);
  const ev: Ev[] = [];
  feed(sp, ['ok\n'], ev);
  // Feed the long line one byte at a time: overflow must fire on byte max+1, not before, not after.
  for (let i = 1; i <= max; i++) {
    feed(sp, ['L'], ev);
    t.is(ev.length, 1, `no overflow after ${i} bytes`);
  }
  feed(sp, ['L'], ev);
  t.deepEqual(ev, [L('ok'), OVER], 'overflow reported on the byte that crosses the limit');
  t.is(sp.buffered, 0, 'nothing held once the line is known to be too long');
  // A lot more of the same line, in chunks bigger than the limit: no more reports, nothing buffered.
  for (let i = 0; i < 100; i++) {
    feed(sp, ['L'.repeat(1000)], ev);
    t.is(sp.buffered, 0);
  }
  t.deepEqual(ev, [L('ok'), OVER], 'reported only once');
  // The end of the long line, then the next line in the same chunk.
  feed(sp, ['LLL\nafter\n'], ev);
  t.deepEqual(ev, [L('ok'), OVER, L('after')]);
  // Skipping really stopped: a following short line is normal again.
  feed(sp, ['again\n'], ev);
  t.deepEqual(ev, [L('ok'), OVER, L('after'), L('again')]);
});

test('LineSplitter: oversized line whose newline is in the chunk that crosses the limit', (t) => {
  const sp = new LineSplitter(4);
  const ev = feed(sp, ['abc', 'defgh\nij\n']);
  t.deepEqual(ev, [OVER, L('ij')]);
  t.is(sp.buffered, 0);
});

test('LineSplitter: several oversized lines in a row, and mixed with good ones in one chunk', (t) => {
  const sp = new LineSplitter(3);
  const ev = feed(sp, ['aaaa\nbbbbbbb\ncc\n\ndddd', 'dd\nee\n']);
  t.deepEqual(ev, [OVER, OVER, L('cc'), L(''), OVER, L('ee')]);
});

test('LineSplitter: never buffers more than the limit (huge newline-free input)', (t) => {
  const sp = new LineSplitter(1024);
  let overflows = 0;
  const big = Buffer.alloc(64 * 1024, 0x41);
  for (let i = 0; i < 160; i++) {
    // 10 MB in total
    sp.push(big, () => t.fail('no line expected'), () => overflows++);
    t.true(sp.buffered <= 1024);
  }
  t.is(overflows, 1);
});

test('LineSplitter: rejects a non-positive limit', (t) => {
  t.throws(() => new LineSplitter(0), { instanceOf: RangeError });
  t.throws(() => new LineSplitter(-1), { instanceOf: RangeError });
  t.throws(() => new LineSplitter(Number.NaN), { instanceOf: RangeError });
});

test('LineSplitter: random streams in random chunks match a reference split', (t) => {
  const seed = pickSeed();
  const rnd = prng(seed);
  for (let round = 0; round < 300; round++) {
    const max = 1 + Math.floor(rnd() * 40);
    const lines: string[] = [];
    const n = Math.floor(rnd() * 30);
    for (let i = 0; i < n; i++) {
      const len = rnd() < 0.2 ? 0 : Math.floor(rnd() * (max * 2 + 2));
      let s = '';
      for (let k = 0; k < len; k++) s += String.fromCharCode(0x20 + Math.floor(rnd() * 0x5e));
      lines.push(s);
    }
    const stream = Buffer.from(lines.map((l) => l + '\n').join(''), 'latin1');
    const expected: Ev[] = lines.map((l) => (l.length > max ? OVER : L(l)));
    const chunks: Buffer[] = [];
    for (let at = 0; at < stream.length; ) {
      const size = Math.floor(rnd() * (max * 3)) + 1;
      chunks.push(stream.subarray(at, at + size));
      at += size;
    }
    const sp = new LineSplitter(max);
    const got = feed(sp, chunks);
    if (JSON.stringify(got) !== JSON.stringify(expected)) {
      t.fail(`mismatch (seed ${seed}, round ${round}, max ${max}); replay with TETHER_SEED=${seed}`);
      t.deepEqual(got, expected);
      return;
    }
    t.is(sp.buffered, 0);
  }
  t.pass();
});

// ---- parseLine ------------------------------------------------------------------

const P = (s: string | Buffer) => parseLine(typeof s === 'string' ? Buffer.from(s, 'utf8') : s);

test('parseLine: empty line is a keepalive', (t) => {
  t.deepEqual(P(''), { kind: 'keepalive' });
});

test('parseLine: one character is invalid, with a reason', (t) => {
  for (const s of ['a', '0', ' ', 'z']) {
    const p = P(s);
    t.is(p.kind, 'invalid', s);
    if (p.kind === 'invalid') t.regex(p.reason, /one-character/);
  }
});

test('parseLine: two hex characters are an ACK, for every mid', (t) => {
  for (let mid = 0; mid < 256; mid++) {
    const hex = mid.toString(16).padStart(2, '0');
    t.deepEqual(P(hex), { kind: 'ack', mid });
    t.deepEqual(P(hex.toUpperCase()), { kind: 'ack', mid }, 'uppercase accepted');
  }
  t.deepEqual(P('aF'), { kind: 'ack', mid: 0xaf });
});

test('parseLine: two non-hex characters are invalid', (t) => {
  for (const s of ['zz', 'g0', '0g', ' 1', '1 ', '-1', 'x5', '0x', 'G0']) {
    const p = P(s);
    t.is(p.kind, 'invalid', JSON.stringify(s));
    if (p.kind === 'invalid') t.regex(p.reason, /not hex/);
  }
  // Two bytes that are one multibyte character: still not hex.
  t.is(P('é').kind, 'invalid');
  t.is(P(Buffer.from([0xff, 0xfe])).kind, 'invalid');
});

test('parseLine: three or more characters with a hex mid are a message', (t) => {
  t.deepEqual(P('00a'), { kind: 'message', mid: 0, payload: 'a' });
  t.deepEqual(P('ffhello world'), { kind: 'message', mid: 255, payload: 'hello world' });
  t.deepEqual(P('7Bupper'), { kind: 'message', mid: 0x7b, payload: 'upper' });
  t.deepEqual(P('0123'), { kind: 'message', mid: 1, payload: '23' }, 'payload may itself look like hex');
  t.deepEqual(P('10 '), { kind: 'message', mid: 16, payload: ' ' });
  t.deepEqual(P('42héllo wörld ✓ 😀'), { kind: 'message', mid: 0x42, payload: 'héllo wörld ✓ 😀' });
  t.deepEqual(P('05{"a":[1,2]}'), { kind: 'message', mid: 5, payload: '{"a":[1,2]}' });
});

test('parseLine: a message whose mid is not hex is invalid', (t) => {
  for (const s of ['g1hello', '1ghello', 'zzzz', 'hello', ' 01x', '\u00e901']) {
    const p = P(s);
    t.is(p.kind, 'invalid', JSON.stringify(s));
    if (p.kind === 'invalid') t.regex(p.reason, /not hex/);
  }
});

test('parseLine: a message with invalid UTF-8 in its payload is invalid', (t) => {
  const bad = [
    [0xc3, 0x28], // bad continuation
    [0xff],
    [0x80], // lone continuation byte
    [0xc0, 0xaf], // overlong '/'
    [0xed, 0xa0, 0x80], // UTF-16 surrogate
    [0xe2, 0x82], // truncated 3-byte sequence
    [0xf4, 0x90, 0x80, 0x80], // above U+10FFFF
  ];
  for (const tail of bad) {
    const p = P(Buffer.concat([Buffer.from('01abc'), Buffer.from(tail)]));
    t.is(p.kind, 'invalid', tail.join(','));
    if (p.kind === 'invalid') t.regex(p.reason, /UTF-8/);
  }
  // A valid multibyte sequence right after the mid is fine.
  t.is(P(Buffer.from([0x30, 0x31, 0xc3, 0xa9])).kind, 'message');
});

test('parseLine never throws on arbitrary bytes', (t) => {
  const seed = pickSeed();
  const rnd = prng(seed);
  for (let i = 0; i < 5000; i++) {
    const len = Math.floor(rnd() * 12);
    const b = Buffer.alloc(len);
    for (let k = 0; k < len; k++) b[k] = Math.floor(rnd() * 256);
    let p;
    try {
      p = parseLine(b);
    } catch (e) {
      t.fail(`threw on ${b.toString('hex')} (seed ${seed}): ${String(e)}`);
      return;
    }
    if (len === 0) t.is(p.kind, 'keepalive');
    else if (len === 1) t.is(p.kind, 'invalid');
  }
  t.pass();
});

test('parseMid reads two hex digits, -1 otherwise', (t) => {
  t.is(parseMid(Buffer.from('a7xyz')), 0xa7);
  t.is(parseMid(Buffer.from('A7')), 0xa7);
  t.is(parseMid(Buffer.from('7g')), -1);
  t.is(parseMid(Buffer.from(':0')), -1, "':' follows '9' in ASCII");
  t.is(parseMid(Buffer.from('/0')), -1, "'/' precedes '0' in ASCII");
  t.is(parseMid(Buffer.from('@0')), -1, "'@' precedes 'A' in ASCII");
  t.is(parseMid(Buffer.from('`0')), -1, "'`' precedes 'a' in ASCII");
});

test('formatMessage / formatAck / midHex round-trip through parseLine', (t) => {
  for (let mid = 0; mid < 256; mid++) {
    t.is(midHex(mid), mid.toString(16).padStart(2, '0'));
    const ack = formatAck(mid);
    t.is(ack, midHex(mid) + '\n');
    t.deepEqual(P(ack.slice(0, -1)), { kind: 'ack', mid });
    const msg = formatMessage(mid, 'pä😀');
    t.true(msg.endsWith('\n'));
    t.deepEqual(P(msg.slice(0, -1)), { kind: 'message', mid, payload: 'pä😀' });
  }
  t.is(KEEPALIVE, '\n');
});

// ---- MidGenerator ------------------------------------------------------------------

test('MidGenerator: 0, 1..255, then 1..255 again (first 600 values against a model)', (t) => {
  const gen = new MidGenerator();
  const model: number[] = [0];
  while (model.length < 600) for (let m = 1; m <= 255 && model.length < 600; m++) model.push(m);
  const got: number[] = [];
  for (let i = 0; i < 600; i++) {
    t.is(gen.next, model[i], `next before take #${i}`);
    got.push(gen.take());
  }
  t.deepEqual(got, model);
  t.is(got.filter((m) => m === 0).length, 1, '0 only once');
  t.is(got[255], 255);
  t.is(got[256], 1, 'wraps to 1, not 0');
});

test('MidGenerator: can start from a given id (carried across reconnects)', (t) => {
  const gen = new MidGenerator(254);
  t.deepEqual([gen.take(), gen.take(), gen.take(), gen.take()], [254, 255, 1, 2]);
});

// ---- DuplicateRing ---------------------------------------------------------------

/** Straightforward model of PROTOCOL.md 1.3's ring: 256 booleans. */
class ReferenceRing {
  readonly seen: boolean[] = new Array<boolean>(256).fill(false);

  isNew(mid: number): boolean {
    if (mid === 0) this.seen.fill(false);
    const fresh = !this.seen[mid];
    this.seen[mid] = true;
    const far = ((mid >> 3) + 16) % 32;
    for (let k = 0; k < 8; k++) this.seen[far * 8 + k] = false;
    return fresh;
  }
}

/** The ring's 32-byte snapshot as 256 booleans (bit `mid & 7` of byte `mid >> 3`). */
function unpack(bytes: Uint8Array): boolean[] {
  const out: boolean[] = [];
  for (let mid = 0; mid < 256; mid++) out.push((bytes[mid >> 3] & (1 << (mid & 7))) !== 0);
  return out;
}

test('DuplicateRing matches the reference model over a long pseudo-random sequence', (t) => {
  const seed = pickSeed();
  const rnd = prng(seed);
  const ring = new DuplicateRing();
  const ref = new ReferenceRing();
  // Start from arbitrary (restored) states now and then, so every rule is exercised.
  const scramble = () => {
    const bytes = new Uint8Array(32);
    for (let k = 0; k < 32; k++) bytes[k] = Math.floor(rnd() * 256);
    ring.restore(bytes);
    for (let m = 0; m < 256; m++) ref.seen[m] = (bytes[m >> 3] & (1 << (m & 7))) !== 0;
  };
  const recent: number[] = [];
  let sender = new MidGenerator();
  let news = 0;
  let dups = 0;
  const steps = 200_000;
  for (let i = 0; i < steps; i++) {
    if (i % 5000 === 0) scramble();
    const r = rnd();
    let mid: number;
    if (r < 0.55) {
      mid = sender.take(); // an orderly sender
    } else if (r < 0.8 && recent.length > 0) {
      mid = recent[Math.floor(rnd() * recent.length)]; // a retransmission of something recent
    } else if (r < 0.995) {
      mid = 1 + Math.floor(rnd() * 255); // anything
    } else {
      sender = new MidGenerator(); // the peer restarted
      mid = sender.take();
    }
    recent.push(mid);
    if (recent.length > 12) recent.shift();
    const want = ref.isNew(mid);
    const got = ring.isNew(mid);
    if (got !== want || i % 97 === 0) {
      const same = got === want && JSON.stringify(unpack(ring.snapshot())) === JSON.stringify(ref.seen);
      if (!same) {
        t.fail(`diverged at step ${i} (mid ${mid}: ring ${got}, model ${want}); seed ${seed}, replay with TETHER_SEED=${seed}`);
        return;
      }
    }
    if (want) news++;
    else dups++;
  }
  t.deepEqual(unpack(ring.snapshot()), ref.seen, `final state (seed ${seed})`);
  t.true(news > 1000 && dups > 1000, `both outcomes exercised (new ${news}, dup ${dups})`);
});

test('DuplicateRing: a repeated id is a duplicate, also repeatedly', (t) => {
  const ring = new DuplicateRing();
  t.true(ring.isNew(0));
  t.true(ring.isNew(1));
  t.true(ring.isNew(2));
  t.false(ring.isNew(2));
  t.false(ring.isNew(1));
  t.false(ring.isNew(2));
  t.true(ring.isNew(3));
});

test('DuplicateRing: mid 0 clears the whole ring first', (t) => {
  const ring = new DuplicateRing();
  for (const m of [5, 6, 7, 100, 101]) t.true(ring.isNew(m));
  t.false(ring.isNew(100));
  t.true(ring.isNew(0), 'a restart is always new');
  t.true(ring.onlyHas(0));
  for (const m of [5, 6, 7, 100, 101]) t.true(ring.isNew(m), `mid ${m} new again after the restart`);
  t.true(ring.isNew(0), 'mid 0 clears first, so it is always new at the ring level');
  t.true(ring.isNew(5), 'and everything seen before it is forgotten');
});

test('DuplicateRing: seeing an id half a ring away makes an old id new again', (t) => {
  const ring = new DuplicateRing();
  t.true(ring.isNew(3)); // byte 0
  t.true(ring.isNew(7)); // byte 0
  t.true(ring.isNew(8)); // byte 1, untouched below
  t.false(ring.isNew(3));
  // Byte 16 holds ids 128..135; seeing any of them clears byte 0 (ids 0..7).
  t.true(ring.isNew(130));
  t.true(ring.isNew(3), 'cleared by 130');
  t.true(ring.isNew(7), 'cleared by 130');
  t.false(ring.isNew(8), 'byte 1 was not touched');
  // 3 is set again, which in turn clears byte 16: 130 is forgotten.
  t.true(ring.isNew(130));
  // And the other way round: byte 31 (248..255) clears byte 15 (120..127).
  t.true(ring.isNew(120));
  t.true(ring.isNew(255));
  t.true(ring.isNew(120));
});

test('DuplicateRing: the far byte is cleared on duplicates too', (t) => {
  // Through isNew alone a duplicate's far byte is always already clear, so build
  // a state where it is not (as a restored snapshot could be).
  const bytes = new Uint8Array(32);
  bytes[0] = 1 << 3; // mid 3
  bytes[16] = 1 << 2; // mid 130
  const ring = new DuplicateRing();
  ring.restore(bytes);
  const ref = new ReferenceRing();
  ref.seen[3] = ref.seen[130] = true;
  t.false(ring.isNew(3), '3 is a duplicate');
  t.false(ref.isNew(3));
  t.true(ring.isNew(130), 'the duplicate 3 still cleared byte 16');
  t.true(ref.isNew(130));
});

test('DuplicateRing: an orderly sender is never seen as duplicate, its immediate resend always is', (t) => {
  const ring = new DuplicateRing();
  const gen = new MidGenerator();
  t.true(ring.isNew(gen.take()), 'mid 0');
  for (let i = 1; i < 2000; i++) {
    const mid = gen.take();
    t.true(ring.isNew(mid), `message #${i} (mid ${mid}) new`);
    t.false(ring.isNew(mid), `resend of #${i} is a duplicate`);
  }
});

test('DuplicateRing: snapshot/restore and onlyHas', (t) => {
  const a = new DuplicateRing();
  for (const m of [0, 9, 77, 100]) a.isNew(m);
  const snap = a.snapshot();
  snap[0] ^= 0xff; // a copy: mutating it does not touch the ring
  const b = new DuplicateRing();
  b.restore(a.snapshot());
  t.deepEqual(unpack(b.snapshot()), unpack(a.snapshot()));
  t.false(b.isNew(77));
  t.throws(() => b.restore(new Uint8Array(31)), { instanceOf: RangeError });
  const c = new DuplicateRing();
  t.false(c.onlyHas(0));
  c.isNew(0);
  t.true(c.onlyHas(0));
  c.isNew(1);
  t.false(c.onlyHas(0));
  c.clear();
  t.deepEqual(unpack(c.snapshot()), new Array<boolean>(256).fill(false));
});

// ---- payloadProblem / normalizePayload ----------------------------------------------

test('normalizePayload strips exactly one trailing newline', (t) => {
  t.is(normalizePayload('abc\n'), 'abc');
  t.is(normalizePayload('abc'), 'abc');
  t.is(normalizePayload('abc\n\n'), 'abc\n');
  t.is(normalizePayload('\n'), '');
  t.is(normalizePayload(''), '');
  t.is(normalizePayload('a\nb'), 'a\nb');
});

test('payloadProblem: empty', (t) => {
  t.is(payloadProblem('', 100), 'empty');
  t.is(payloadProblem(normalizePayload('\n'), 100), 'empty', 'a lone newline is an empty payload');
});

test('payloadProblem: newline inside', (t) => {
  t.is(payloadProblem('a\nb', 100), 'newline');
  t.is(payloadProblem('\nb', 100), 'newline');
  t.is(payloadProblem(normalizePayload('ab\n\n'), 100), 'newline', 'only one trailing newline is stripped');
  t.is(payloadProblem(normalizePayload('ab\n'), 100), null, 'a single trailing newline is fine');
});

test('payloadProblem: length counts UTF-8 bytes plus the 2-digit id', (t) => {
  const max = 10;
  t.is(payloadProblem('a'.repeat(8), max), null, '8 + 2 = limit');
  t.is(payloadProblem('a'.repeat(9), max), 'too-long');
  t.is(payloadProblem('é'.repeat(4), max), null, '4 chars, 8 bytes');
  t.is(payloadProblem('é'.repeat(4) + 'a', max), 'too-long', '5 chars but 9 bytes');
  t.is(payloadProblem('😀😀', max), null, '2 code points, 4 UTF-16 units, 8 bytes');
  t.is(payloadProblem('😀😀a', max), 'too-long');
  t.is(payloadProblem('€€€', max), 'too-long', '3 chars, 9 bytes');
  t.is(payloadProblem('€€a', max), null, '3 chars, 7 bytes');
  // The exact limit is consistent with what a receiving LineSplitter of the same limit accepts.
  const payload = 'é'.repeat(4);
  const wire = Buffer.from(formatMessage(1, payload));
  const ev = feed(new LineSplitter(max), [wire]);
  t.deepEqual(ev.length, 1);
  t.false('overflow' in ev[0]);
});

test('payloadProblem: ordinary payloads are fine', (t) => {
  for (const s of ['x', 'hello', '{"t":21.5}', ' ', '00', 'ab', '\t', 'a\r']) t.is(payloadProblem(s, 100), null, JSON.stringify(s));
});
