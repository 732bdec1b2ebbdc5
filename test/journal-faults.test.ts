/**
 * The persistence journal never takes the server down (issue 14, items 1, 2,
 * 10 and 12). Fast tests check file names, record validation, options, the
 * size bound and the open-file cap in process; the others do each fault to a
 * real `tether serve` process over real sockets and check that the server stays
 * up, a bystander device keeps its link, and nothing acknowledged is lost.
 */
import test, { ExecutionContext } from 'ava';
import { ChildProcess, spawn, spawnSync } from 'node:child_process';
import fc from 'fast-check';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Client } from '../src/client';
import { checkStoreOptions, FileStore, idFromName, JournalDamage, journalName, parseJournal, STORE_DEFAULTS } from '../src/store';
import { freePort } from './helpers/mosquitto';
import { RawPeer } from './helpers/raw';
import { eventually, within } from './helpers/wait';

const ROOT = path.join(__dirname, '..');
const BIN = path.join(ROOT, 'bin', 'tether.js');
const RECORDER = path.join(ROOT, 'test', 'fixtures', 'record-app.ts');
const T = 2000;
const RING0 = '0'.repeat(64);

function tmpdir(t: ExecutionContext, cleanup?: () => void): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-jfault-'));
  t.teardown(() => {
    cleanup?.();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return dir;
}

function snap(fields: Record<string, unknown> = {}): string {
  return JSON.stringify({ S: { nextMid: 5, nextKey: 3, ring: RING0, lastMid0: null, outbound: [], inbound: [], ...fields } });
}

// ---- fast: names ---------------------------------------------------------------

test('journal names: short plain IDs keep the name earlier versions gave them', (t) => {
  t.is(journalName('keeper'), 'keeper.jsonl');
  t.is(journalName('a b/c'), 'a%20b%2Fc.jsonl');
  t.is(journalName('café'), 'caf%C3%A9.jsonl');
  t.is(idFromName('a%20b%2Fc.jsonl'), 'a b/c');
  t.is(idFromName('caf%C3%A9.jsonl'), 'café');
});

test('journal names: long, CJK and odd IDs get a bounded hashed name the file system accepts', (t) => {
  const dir = tmpdir(t);
  const ids = ['a'.repeat(300), '設'.repeat(28), 'é'.repeat(500), 'lamp*7', 'x\uD800y', '\uDC00', '.', '..', 'a'.repeat(160), 'a'.repeat(161)];
  const names = new Set<string>();
  for (const id of ids) {
    const name = journalName(id);
    t.true(Buffer.byteLength(name) <= 166, `${name.length}: ${name}`);
    t.regex(name, /^[A-Za-z0-9%._~!'()+-]+\.jsonl$/);
    fs.writeFileSync(path.join(dir, name), 'x'); // the name works, and leaves room for .tmp and .damaged-<time>
    fs.writeFileSync(path.join(dir, name + '.damaged-20250101T000000000Z-99'), 'x');
    names.add(name);
  }
  t.is(names.size, ids.length, 'every ID has its own name');
  t.is(journalName('a'.repeat(160)), 'a'.repeat(160) + '.jsonl', 'up to 160 encoded characters the name is the ID');
  t.regex(journalName('a'.repeat(161)), /^a{40}\+[0-9a-f]{32}\.jsonl$/);
  t.is(idFromName(journalName('a'.repeat(300))), null, 'a hashed name does not claim an ID');
  t.not(journalName('x\uD800y'), journalName('x\uDBFFy'), 'lone surrogates are told apart');
});

test('journal names (property): any string gives a short, safe name, and different IDs different names', (t) => {
  const seen = new Map<string, string>();
  fc.assert(
    fc.property(
      fc.oneof(
        fc.string({ unit: 'binary', minLength: 1, maxLength: 400 }),
        fc.string({ unit: 'grapheme', minLength: 1, maxLength: 200 }),
        fc.string({ unit: fc.integer({ min: 0, max: 0xffff }).map((c) => String.fromCharCode(c)), minLength: 1, maxLength: 300 }),
      ),
      (id) => {
        const name = journalName(id);
        if (Buffer.byteLength(name) > 166 || !/^[A-Za-z0-9%._~!'()+-]+\.jsonl$/.test(name)) return false;
        const other = seen.get(name);
        if (other !== undefined && other !== id) return false;
        seen.set(name, id);
        const back = idFromName(name);
        return back === null || back === id;
      },
    ),
    { seed: 14, numRuns: 3000 },
  );
  t.pass();
});

// ---- fast: validation ---------------------------------------------------------

test('journal validation: a healthy journal replays; a torn last record is skipped', (t) => {
  const text = [
    snap({ id: 'dev', outbound: [{ key: 1, payload: 'out', wait: true, mid: 4 }], inbound: ['in one'] }),
    JSON.stringify({ q: [3, 'two', false] }),
    JSON.stringify({ m: [3, 5] }),
    JSON.stringify({ n: [9, 'in two'] }),
    JSON.stringify({ p: 9 }),
    JSON.stringify({ r: [10, 'in three'] }), // a record of an earlier version: the ring decides
    JSON.stringify({ r: [10, 'in three'] }),
    JSON.stringify({ t: 1 }),
    JSON.stringify({ y: ['light', { room: 'hall' }] }),
  ].join('\n');
  const { state, torn } = parseJournal(text + '\n{"q":[4,"half');
  t.true(torn);
  const r = state.restored();
  t.is(r.nextMid, 6);
  t.is(r.nextKey, 4);
  t.deepEqual(r.inbound, ['in two', 'in three']);
  t.deepEqual(
    r.outbound.map((o) => [o.key, o.mid]),
    [
      [1, 4],
      [3, 5],
    ],
  );
  t.is(r.type, 'light');
  t.deepEqual(r.meta, { room: 'hall' });
});

test('journal validation: every kind of damage is found and named, never a crash or a bad value', (t) => {
  const cases: Array<[string, string, RegExp]> = [
    ['damaged middle line', `${snap()}\n{"r":[1,"x"\n{"t":1}\n`, /line 2 is not JSON/],
    ['null line', `${snap()}\nnull\n`, /line 2: record is null/],
    ['a list', '[1,2,3]\n', /record is a list/],
    ['wrong shape', `${snap()}\n{"q":[1,"x"]}\n`, /"q" record is not/],
    ['two fields', `${snap()}\n{"a":1,"d":2}\n`, /2 fields/],
    ['unknown record', `${snap()}\n{"z":1}\n`, /unknown record type "z"/],
    ['short ring', `${snap({ ring: '00ff' })}\n`, /ring is not 32 bytes/],
    ['nextMid missing', `{"S":${JSON.stringify({ nextKey: 1, ring: RING0, lastMid0: null, outbound: [], inbound: [] })}}\n`, /nextMid/],
    ['nextMid out of range', `${snap({ nextMid: 300 })}\n`, /nextMid is not a message id/],
    ['nextMid a string', `${snap({ nextMid: '1' })}\n`, /nextMid/],
    ['mid out of range', `${snap()}\n{"m":[1,256]}\n`, /"m" record/],
    ['negative key', `${snap()}\n{"a":-1}\n`, /"a" record is not a key/],
    ['payload with a newline', `${snap()}\n{"r":[1,"a\\nb"]}\n`, /"r" record/],
    ['empty payload', `${snap({ inbound: [''] })}\n`, /inbound\[0\]/],
    ['outbound mid twice', `${snap({ outbound: [{ key: 1, payload: 'a', wait: true, mid: 3 }, { key: 2, payload: 'b', wait: true, mid: 3 }] })}\n`, /mid 3 appears twice/],
    ['outbound key twice', `${snap({ outbound: [{ key: 1, payload: 'a', wait: true }, { key: 1, payload: 'b', wait: true }] })}\n`, /key 1 appears twice/],
    ['key reused', `${snap({ outbound: [{ key: 1, payload: 'a', wait: true }] })}\n{"q":[1,"b",true]}\n`, /reuses key 1/],
    ['sent with nextMid 0', `${snap({ nextMid: 0, outbound: [{ key: 1, payload: 'a', wait: true, mid: 3 }] })}\n`, /nextMid is 0/],
    ['old record without a line', `${snap()}\n{"r":[7]}\n`, /"r" record is not/],
    ['repeat id out of range', `${snap()}\n{"p":256}\n`, /"p" record is not a message id/],
    ['new line without a line', `${snap()}\n{"n":[3,""]}\n`, /"n" record is not/],
    ['unknown snapshot field', `${snap({ extra: 1 })}\n`, /unknown field "extra"/],
    ['meta not an object', `${snap()}\n{"y":["t",[1]]}\n`, /metadata is not an object/],
  ];
  for (const [what, text, why] of cases) {
    const e = t.throws(() => parseJournal(text), { instanceOf: JournalDamage }, what);
    if (e) t.regex(e.message, why, what);
  }
});

test('persist options are validated, with what to do', (t) => {
  t.deepEqual(checkStoreOptions({ dir: 'x' }), { dir: 'x', ...STORE_DEFAULTS });
  const bad: Array<[Record<string, unknown>, RegExp]> = [
    [{ dir: 'x', fsync: 'yes' }, /persist\.fsync must be true or false, got "yes".*default \(false\)/],
    [{ dir: 'x', compactEvery: 0 }, /persist\.compactEvery must be an integer from 1 .*default \(2000\)/],
    [{ dir: 'x', compactEvery: 1.5 }, /compactEvery/],
    [{ dir: 'x', compactBytes: 100 }, /persist\.compactBytes must be an integer from 4096 .*default \(1048576\)/],
    [{ dir: 'x', maxOpenFiles: 0 }, /persist\.maxOpenFiles must be an integer from 1 .*default \(256\)/],
    [{ dir: '' }, /persist\.dir must be a folder path/],
  ];
  for (const [opts, why] of bad) {
    const e = t.throws(() => new FileStore(opts as never), undefined, JSON.stringify(opts));
    if (e) {
      t.is((e as { code?: string }).code, 'ERR_BAD_CONFIG');
      t.regex(e.message, why);
    }
  }
});

test('tether serve refuses bad persist options and says what to do', (t) => {
  const dir = tmpdir(t);
  const cases: Array<[Record<string, unknown>, RegExp]> = [
    [{ dir: path.join(dir, 'j'), fsync: 'yes' }, /persist\.fsync must be true or false, got "yes": fix it in the config, or leave it out for the default \(false\)/],
    [{ dir: path.join(dir, 'j'), compactEvery: 0 }, /persist\.compactEvery must be an integer from 1 to \d+, got 0/],
  ];
  for (const [persist, why] of cases) {
    const config = path.join(dir, 'bad.json');
    fs.writeFileSync(config, JSON.stringify({ host: '127.0.0.1', port: 0, http: null, persist }));
    const r = spawnSync(process.execPath, [BIN, 'serve', '--config', config], { cwd: ROOT, encoding: 'utf8', timeout: 60_000 });
    t.not(r.status, 0);
    t.regex(r.stderr + r.stdout, why);
  }
});

// ---- fast: the store on real files, in process ----------------------------------

test('the journal follows the mid-0 rule across links: a resend on the same link is a repeat, the same line after a reconnect is new', (t) => {
  const dir = tmpdir(t);
  const store = new FileStore({ dir });
  const { journal } = store.attach('sleeper');
  store.linked('sleeper', undefined, undefined);
  journal.received(0, 'on'); // new
  journal.received(0, 'on'); // its resend on the same link (our ACK was late): a repeat
  journal.received(1, 'off');
  store.linked('sleeper', undefined, undefined); // woke from deep sleep: a new link, numbering from 0 again
  journal.received(0, 'on'); // a new reading that happens to be the same
  store.linked('sleeper', undefined, { boot: 'b1' }, 'b1');
  journal.received(0, 'on');
  store.linked('sleeper', undefined, { boot: 'b1' }, 'b1'); // same boot id: the link came back, the board did not reboot
  journal.received(0, 'on');
  journal.received(2, 'up', true); // the Connection's own verdict wins when it gives one
  journal.received(2, 'up', false);
  store.closeAll();
  const [r] = new FileStore({ dir }).restoreAll();
  t.deepEqual(r.restored.inbound, ['on', 'off', 'on', 'on', 'up']);
  t.deepEqual(r.restored.meta, { boot: 'b1' });
});

test('size bound: fresh 60 KB lines and repeats of one keep a journal within snapshot + max(compactBytes, snapshot) + one record', (t) => {
  const dir = tmpdir(t);
  const store = new FileStore({ dir, compactBytes: 256 * 1024 });
  const { journal } = store.attach('big');
  const file = store.fileOf('big');
  const line = 'x'.repeat(60 * 1024);
  let max = 0;
  for (let i = 0; i < 200; i++) {
    journal.received((i % 255) + 1, line + i);
    journal.taken();
    max = Math.max(max, fs.statSync(file).size);
  }
  // The snapshot holds at most one unread line here.
  const bound = 61 * 1024 + 256 * 1024 + 61 * 1024 + 64;
  t.true(max <= bound, `fresh lines: ${max} > ${bound}`);
  journal.received(7, line);
  for (let i = 0; i < 2000; i++) journal.received(7, line); // the same message over and over
  const size = fs.statSync(file).size;
  t.true(size < 200 * 1024, `repeats: ${size} bytes (a repeat is stored without its line)`);
  t.true(store.stats().compactions > 5);
  store.closeAll();
  const again = new FileStore({ dir });
  const [r] = again.restoreAll();
  t.deepEqual(r.restored.inbound, [line], 'the repeated message is there once');
  again.closeAll();
});

test('open journal files stay under maxOpenFiles; idle ones are reopened on demand and nothing is lost', (t) => {
  const dir = tmpdir(t);
  const store = new FileStore({ dir, maxOpenFiles: 4 });
  const journals = Array.from({ length: 50 }, (_, i) => store.attach(`dev-${i}`).journal);
  for (let round = 0; round < 5; round++) {
    journals.forEach((j, i) => {
      j.received(round + 1, `line ${round} of ${i}`);
      t.true(store.stats().openFiles <= 4);
    });
  }
  t.is(store.stats().journals, 50);
  t.is(store.stats().degraded, 0);
  store.closeAll();
  const again = new FileStore({ dir });
  const restored = again.restoreAll();
  t.is(restored.length, 50);
  for (const r of restored) {
    const i = r.id.slice(4);
    t.deepEqual(r.restored.inbound, [0, 1, 2, 3, 4].map((n) => `line ${n} of ${i}`));
  }
  again.closeAll();
});

test('attach() finds a journal under the name an earlier version gave its ID, and moves it to the new name', (t) => {
  const dir = tmpdir(t);
  fs.writeFileSync(path.join(dir, 'lamp*7.jsonl'), snap({ inbound: ['from before'] }) + '\n');
  const store = new FileStore({ dir });
  const { restored } = store.attach('lamp*7');
  t.deepEqual(restored?.inbound, ['from before']);
  t.false(fs.existsSync(path.join(dir, 'lamp*7.jsonl')));
  t.true(fs.existsSync(store.fileOf('lamp*7')));
  store.closeAll();
});

test('at start: damaged journals are quarantined and counted, old long names are migrated, the rest load', (t) => {
  const dir = tmpdir(t);
  const longId = 'b'.repeat(200);
  fs.writeFileSync(path.join(dir, encodeURIComponent(longId) + '.jsonl'), snap({ inbound: ['from the old name'] }) + '\n');
  fs.writeFileSync(path.join(dir, 'good.jsonl'), snap({ inbound: ['kept'] }) + '\n');
  fs.writeFileSync(path.join(dir, 'bad.jsonl'), snap() + '\nnull\n');
  fs.writeFileSync(path.join(dir, 'wrong.jsonl'), snap({ id: 'someone-else' }) + '\n');
  fs.writeFileSync(path.join(dir, 'nameless+0123456789abcdef0123456789abcdef.jsonl'), snap() + '\n');
  fs.mkdirSync(path.join(dir, 'folder.jsonl'));
  const logs: string[] = [];
  const logger = { debug() {}, info() {}, warn: (m: string) => logs.push(m), error: (m: string) => logs.push(m), child: () => logger, level: 'info' as const };
  const store = new FileStore({ dir, logger });
  const restored = store.restoreAll();
  t.deepEqual(restored.map((r) => r.id).sort(), [longId, 'good'].sort());
  t.deepEqual(restored.find((r) => r.id === longId)!.restored.inbound, ['from the old name']);
  t.true(fs.existsSync(store.fileOf(longId)), 'moved to its new (hashed) name');
  t.is(store.stats().quarantined, 4);
  const aside = fs.readdirSync(dir).filter((n) => n.includes('.damaged-'));
  t.is(aside.length, 4, aside.join(', '));
  t.true(logs.some((m) => m.includes('damaged journal moved aside')));
  // A quarantined ID starts afresh when it connects.
  t.is(store.attach('bad').restored, null);
  store.closeAll();
});

// ---- real server processes ---------------------------------------------------------

interface LogRec {
  level: string;
  msg: string;
  [k: string]: unknown;
}

interface Served {
  proc: ChildProcess;
  logs: LogRec[];
  out: () => string;
  exited: Promise<void>;
  alive(): boolean;
  /** Resolves with the first log record matching, failing after `ms`. */
  waitLog(what: string, pred: (r: LogRec) => boolean, ms?: number): Promise<LogRec>;
}

/** Starts `tether serve` on a config file (optionally under `ulimit -n`), resolving once it listens. */
async function serve(t: ExecutionContext, config: string, env: Record<string, string> = {}, ulimit?: number): Promise<Served> {
  const args = [BIN, 'serve', '--config', config];
  const proc = ulimit
    ? spawn('bash', ['-c', `ulimit -n ${ulimit} && exec "$0" "$@"`, process.execPath, ...args], { cwd: ROOT, env: { ...process.env, ...env } })
    : spawn(process.execPath, args, { cwd: ROOT, env: { ...process.env, ...env } });
  t.teardown(() => {
    if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
  });
  let out = '';
  let partial = '';
  const logs: LogRec[] = [];
  proc.stdout!.on('data', (d: Buffer) => {
    out += d;
    const parts = (partial + d.toString()).split('\n');
    partial = parts.pop()!;
    for (const p of parts) {
      try {
        logs.push(JSON.parse(p));
      } catch {
        // not a log record
      }
    }
  });
  proc.stderr!.on('data', (d) => (out += d));
  const exited = new Promise<void>((r) => proc.once('exit', () => r()));
  const s: Served = {
    proc,
    logs,
    out: () => out,
    exited,
    alive: () => proc.exitCode === null && proc.signalCode === null,
    async waitLog(what, pred, ms = 20_000) {
      let found: LogRec | undefined;
      await eventually(
        () => {
          if (!s.alive()) throw new Error(`server exited while waiting for ${what}:\n${out.slice(-3000)}`);
          return (found = logs.find(pred)) !== undefined;
        },
        ms,
        what,
      );
      return found!;
    },
  };
  await s.waitLog('listening', (r) => r.msg === 'listening', 30_000);
  if (JSON.parse(fs.readFileSync(config, 'utf8')).http) await s.waitLog('HTTP API', (r) => r.msg === 'HTTP API listening', 30_000);
  return s;
}

async function kill(s: Served): Promise<void> {
  s.proc.kill('SIGKILL');
  await within(s.exited, 10_000, 'the server to die');
}

interface Setup {
  dir: string;
  journal: string;
  port: number;
  record: string;
  /**
   * Writes a config with the recorder app for every ID and returns its path.
   * `recorder`: the run reads and records lines (pass RECORD_FILE, see
   * reading()); otherwise the app holds the devices and their lines stay unread.
   */
  config(recorder: boolean, extra?: Record<string, unknown>): string;
  /** The environment for a run whose app reads and records. */
  reading: Record<string, string>;
}

async function setup(t: ExecutionContext, journal?: string, cleanup?: () => void): Promise<Setup> {
  const dir = tmpdir(t, cleanup);
  const port = await freePort();
  const j = journal ?? path.join(dir, 'journal');
  return {
    dir,
    journal: j,
    port,
    record: path.join(dir, 'recorded.jsonl'),
    reading: { RECORD_FILE: path.join(dir, 'recorded.jsonl') },
    config(recorder, extra = {}) {
      const file = path.join(dir, recorder ? 'with-app.json' : 'plain.json');
      fs.writeFileSync(
        file,
        JSON.stringify({
          host: '127.0.0.1',
          port,
          timeout: T,
          settleDelay: 0,
          persist: j,
          apps: [{ script: RECORDER, clients: '*' }],
          log: { level: 'info', format: 'json' },
          http: null,
          ...extra,
        }),
      );
      return file;
    },
  };
}

function recorded(file: string): Array<[string, string]> {
  if (!fs.existsSync(file)) return [];
  return fs
    .readFileSync(file, 'utf8')
    .split('\n')
    .filter(Boolean)
    .map((l) => JSON.parse(l));
}

function linesOf(file: string, id: string): string[] {
  return recorded(file)
    .filter(([i]) => i === id)
    .map(([, l]) => l);
}

/** A device on a raw socket: its own message ids (0, 1, … 255, 1, …), keepalives every T/4. */
class Device {
  private mid = 0;
  private constructor(readonly peer: RawPeer) {}

  static async open(t: ExecutionContext, port: number, idLine: string): Promise<Device> {
    const peer = await RawPeer.hello(port, idLine);
    const ka = setInterval(() => peer.send('\n'), T / 4);
    t.teardown(() => {
      clearInterval(ka);
      peer.close();
    });
    peer.closed.then(() => clearInterval(ka), () => {});
    return new Device(peer);
  }

  /** Sends one qos message and waits for its ACK. */
  async send(payload: string, ms = 10_000): Promise<void> {
    const hex = this.mid.toString(16).padStart(2, '0');
    this.mid = this.mid >= 255 ? 1 : this.mid + 1;
    const from = this.peer.received.length;
    this.peer.send(hex + payload + '\n');
    await this.peer.until((lines) => lines.indexOf(hex, from) >= 0, ms);
  }

  close(): void {
    this.peer.close();
  }
}

/** A Node client that should notice nothing: one link from start to end. */
async function bystander(t: ExecutionContext, port: number): Promise<Client> {
  const c = new Client({ id: 'bystander', port, timeout: T, reconnectDelay: 100, retryMin: 100, retryMax: 400 });
  t.teardown(() => c.close());
  await within(c.connect(), 10_000, 'the bystander to connect');
  return c;
}

async function bystanderUnharmed(t: ExecutionContext, c: Client, s: Served): Promise<void> {
  t.true(s.alive(), 'the server is up');
  t.true(c.isUp, 'the bystander link is up');
  t.is(c.connects, 1, 'the bystander never lost its link');
  await within(c.write('bystander still here'), 10_000, "the bystander's write to be ACKed");
}

test.serial('an ID of 300 "a", 28 CJK characters or 500 "é" with persist on: the server stays up, lines survive a SIGKILL', async (t) => {
  const s = await setup(t);
  const a = await serve(t, s.config(false));
  const by = await bystander(t, s.port);
  const ids = ['a'.repeat(300), '設'.repeat(28), 'é'.repeat(500), 'lamp*7', `tail-${'z'.repeat(150)}`];
  for (const id of ids) {
    const d = await Device.open(t, s.port, id);
    await d.send(`first from ${id.slice(0, 8)}`);
    await d.send(`second from ${id.slice(0, 8)}`);
    d.close();
  }
  await bystanderUnharmed(t, by, a);
  for (const name of fs.readdirSync(s.journal)) t.true(Buffer.byteLength(name) <= 166, name);
  by.close();
  await kill(a);
  const b = await serve(t, s.config(true), s.reading);
  await eventually(() => ids.every((id) => linesOf(s.record, id).length === 2), 20_000, 'every long-ID line read by the app after the restart');
  for (const id of ids) t.deepEqual(linesOf(s.record, id), [`first from ${id.slice(0, 8)}`, `second from ${id.slice(0, 8)}`]);
  t.true(b.alive());
});

test.serial('damaged journals (bad middle line, wrong shape, null, short ring, bad nextMid…) are quarantined; those devices start afresh, the others keep everything', async (t) => {
  const s = await setup(t);
  fs.mkdirSync(s.journal);
  const victims: Record<string, string> = {
    'v-middle': `${snap()}\n{"r":[1,"x"\n{"t":1}\n`,
    'v-shape': `${snap()}\n{"q":[1,"x"]}\n`,
    'v-null': `${snap()}\nnull\n`,
    'v-ring': `${snap({ ring: '00ff' })}\n`,
    'v-nomid': `{"S":${JSON.stringify({ nextKey: 1, ring: RING0, lastMid0: null, outbound: [], inbound: [] })}}\n`,
    'v-mid300': `${snap({ nextMid: 300 })}\n`,
    'v-list': '[1,2,3]\n',
    'v-binary': '\u0000\u00ff garbage {\n{"S":\n',
  };
  for (const [id, text] of Object.entries(victims)) fs.writeFileSync(path.join(s.journal, `${id}.jsonl`), text);
  fs.writeFileSync(
    path.join(s.journal, 'keeper.jsonl'),
    snap({ nextMid: 7, nextKey: 2, inbound: ['kept one', 'kept two'], outbound: [{ key: 1, payload: 'queued for keeper', wait: true }] }) + '\n',
  );
  const srv = await serve(t, s.config(true), { ...s.reading, GREET: '1' });
  const summary = await srv.waitLog('the restore summary', (r) => r.msg === 'journals restored');
  t.is(summary.quarantined, Object.keys(victims).length);
  t.is(summary.devices, 1);
  t.is(fs.readdirSync(s.journal).filter((n) => n.includes('.damaged-')).length, Object.keys(victims).length, 'every damaged file is kept aside');
  // The healthy journal: its unread lines reach the app before the device is back.
  await eventually(() => linesOf(s.record, 'keeper').length === 2, 10_000, "keeper's restored lines read by the app");
  t.deepEqual(linesOf(s.record, 'keeper'), ['kept one', 'kept two']);
  const by = await bystander(t, s.port);
  for (const id of Object.keys(victims)) {
    const d = await Device.open(t, s.port, id);
    const greeting = (await d.peer.next()).line;
    t.is(greeting, '00hello', `${id} starts afresh at mid 00 (never "undefinedhello")`);
    d.peer.send('00\n');
    await d.send(`data from ${id}`);
    d.close();
  }
  const keeper = await Device.open(t, s.port, 'keeper');
  t.is((await keeper.peer.next()).line, '07queued for keeper', 'the restored queue goes out with the restored id counter');
  keeper.peer.send('07\n');
  t.is((await keeper.peer.next()).line, '08hello');
  keeper.peer.send('08\n');
  await eventually(() => Object.keys(victims).every((id) => linesOf(s.record, id).length === 1), 10_000, "the victims' lines");
  for (const id of Object.keys(victims)) t.deepEqual(linesOf(s.record, id), [`data from ${id}`]);
  await bystanderUnharmed(t, by, srv);
  t.true(srv.logs.some((r) => r.msg === 'damaged journal moved aside: this device starts afresh' && typeof r.hint === 'string'));
});

test.serial('after a restart, journaled devices exist at once: the app reads their unread lines and the API knows them (type and metadata too)', async (t) => {
  const s = await setup(t);
  const a = await serve(t, s.config(false, { idLineTypes: true }));
  const d = await Device.open(t, s.port, 'sensor##thermo##{"room":"lab"}');
  for (const l of ['21.5', '21.7', '21.9']) await d.send(l);
  d.close();
  await kill(a);
  const httpPort = await freePort();
  const b = await serve(t, s.config(true, { idLineTypes: true, http: { host: '127.0.0.1', port: httpPort } }), s.reading);
  await eventually(() => linesOf(s.record, 'sensor').length === 3, 10_000, "sensor's lines read by the app, the device still away");
  t.deepEqual(linesOf(s.record, 'sensor'), ['21.5', '21.7', '21.9']);
  const res = await fetch(`http://127.0.0.1:${httpPort}/api/devices/sensor`);
  t.is(res.status, 200, 'not "has never connected"');
  const body = (await res.json()) as { device: { id: string; status: string; type: string; meta: Record<string, unknown> } };
  t.is(body.device.status, 'down');
  t.is(body.device.type, 'thermo');
  t.deepEqual(body.device.meta, { room: 'lab' });
  const list = (await (await fetch(`http://127.0.0.1:${httpPort}/api/devices`)).json()) as unknown;
  t.true(JSON.stringify(list).includes('"sensor"'));
  t.true(b.alive());
});

test.serial('journal size is bounded: one 60 KB message repeated 400 times, then 300 fresh 60 KB lines', async (t) => {
  const s = await setup(t);
  const srv = await serve(t, s.config(true), s.reading);
  const by = await bystander(t, s.port);
  let max = 0;
  const poll = setInterval(() => {
    for (const n of fs.readdirSync(s.journal)) {
      try {
        max = Math.max(max, fs.statSync(path.join(s.journal, n)).size);
      } catch {
        // renamed meanwhile (a compaction)
      }
    }
  }, 5);
  t.teardown(() => clearInterval(poll));
  const big = 'r'.repeat(60 * 1024);
  const rep = await Device.open(t, s.port, 'repeater');
  await rep.send(big);
  for (let i = 0; i < 400; i++) {
    // The same message id and line, as a device does when it never hears the ACK.
    rep.peer.send('00' + big + '\n');
    await rep.peer.until((lines) => lines.filter((l) => l === '00').length >= i + 2);
  }
  const afterRepeats = max;
  const st = await Device.open(t, s.port, 'streamer');
  for (let i = 0; i < 300; i++) {
    await st.send(`${i}:${big}`);
    // The app has taken it: at most one line sits in a snapshot.
    await eventually(() => linesOf(s.record, 'streamer').length > i, 10_000, `line ${i} read by the app`, 2);
  }
  clearInterval(poll);
  // The documented bound, snapshot + max(compactBytes, snapshot) + one record, with a snapshot of
  // at most two 60 KB lines (the last mid-0 line, kept for the mid-0 rule, and one not yet taken).
  const bound = STORE_DEFAULTS.compactBytes + 3 * 62 * 1024;
  t.log(`largest journal seen: ${afterRepeats} bytes with repeats, ${max} bytes with fresh lines (bound ${bound})`);
  t.true(afterRepeats <= bound, `${afterRepeats}`);
  t.true(max <= bound, `${max}`);
  t.is(linesOf(s.record, 'repeater').length, 1, 'the repeated message was delivered once');
  t.is(linesOf(s.record, 'streamer').length, 300);
  await bystanderUnharmed(t, by, srv);
});

// ---- write failures ------------------------------------------------------------------

function can(cmd: string, args: string[]): boolean {
  return spawnSync(cmd, args).status === 0;
}

/** Whether this machine lets us mount a tmpfs (root in a sandbox that allows it). */
const TMPFS = (() => {
  const probe = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-tmpfs-probe-'));
  const ok = can('mount', ['-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', probe]) && can('umount', [probe]);
  fs.rmSync(probe, { recursive: true, force: true });
  return ok;
})();

/** Whether `chattr +i` works on the temp folder's file system (root, ext4 and the like). */
const CHATTR = (() => {
  const probe = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-chattr-probe-'));
  const ok = can('chattr', ['+i', probe]);
  if (ok) can('chattr', ['-i', probe]);
  fs.rmSync(probe, { recursive: true, force: true });
  return ok;
})();

/**
 * The common shape of a write-failure test: devices send while the journal
 * cannot be written (the server ACKs and keeps them in memory), the fault is
 * removed, the journal recovers by itself, the server is killed, and a restart
 * hands every acknowledged line to the app.
 */
async function writeFailure(
  t: ExecutionContext,
  s: Setup,
  opts: { breakIt(): void; fixIt(): void; code: string; config?: Record<string, unknown> },
): Promise<void> {
  const a = await serve(t, s.config(false, opts.config));
  const by = await bystander(t, s.port);
  const old = await Device.open(t, s.port, 'old-timer');
  await old.send('before 1');
  await old.send('before 2');
  opts.breakIt();
  const sent: Record<string, string[]> = { 'old-timer': ['before 1', 'before 2'], newcomer: [] };
  const newcomer = await Device.open(t, s.port, 'newcomer');
  for (let i = 0; i < 20; i++) {
    for (const [id, dev] of [
      ['old-timer', old],
      ['newcomer', newcomer],
    ] as const) {
      const line = `${id} ${i} ${'p'.repeat(2000)}`;
      await dev.send(line);
      sent[id].push(line.length > 100 ? `${line.slice(0, 40)}…${line.length}` : line);
    }
  }
  const failed = await a.waitLog('a write failure', (r) => r.msg.startsWith('journal write failed'));
  t.is(failed.code, opts.code);
  t.regex(String(failed.hint), /resumes by itself/);
  await bystanderUnharmed(t, by, a);
  opts.fixIt();
  for (const id of ['old-timer', 'newcomer']) {
    await a.waitLog(`${id} to recover`, (r) => r.msg.startsWith('journal writable again') && r.client === id, 60_000);
  }
  old.close();
  newcomer.close();
  by.close();
  await kill(a);
  const b = await serve(t, s.config(true, opts.config), s.reading);
  for (const id of ['old-timer', 'newcomer']) {
    await eventually(() => linesOf(s.record, id).length >= sent[id].length, 20_000, `${id}'s lines after the restart`);
    t.deepEqual(linesOf(s.record, id), sent[id], `every line ${id} had ACKed is read once, in order`);
  }
  t.true(b.alive());
}

(TMPFS ? test.serial : test.skip)('disk full (ENOSPC, a small tmpfs): the device keeps working in memory, persistence resumes when space is back, nothing ACKed is lost', async (t) => {
  let mounted = '';
  const s = await setup(t, undefined, () => {
    if (mounted) spawnSync('umount', ['-l', mounted]);
  });
  fs.mkdirSync(s.journal);
  t.true(can('mount', ['-t', 'tmpfs', '-o', 'size=512k', 'tmpfs', s.journal]), 'mount a tmpfs');
  mounted = s.journal;
  const junk = path.join(s.journal, 'junk.bin');
  await writeFailure(t, s, {
    code: 'ENOSPC',
    breakIt() {
      const free = fs.statfsSync(s.journal).bavail * fs.statfsSync(s.journal).bsize;
      fs.writeFileSync(junk, Buffer.alloc(Math.max(0, free - 12 * 1024)));
    },
    fixIt: () => fs.rmSync(junk),
  });
});

(CHATTR ? test.serial : test.skip)('unwritable journal folder (EPERM, chattr +i): new and known devices keep working in memory, persistence resumes when fixed', async (t) => {
  let locked = '';
  const s = await setup(t, undefined, () => {
    if (locked) spawnSync('chattr', ['-i', locked]);
  });
  await writeFailure(t, s, {
    code: 'EPERM',
    config: { persist: { dir: s.journal, compactEvery: 5 } },
    breakIt() {
      t.true(can('chattr', ['+i', s.journal]), 'chattr +i');
      locked = s.journal;
    },
    fixIt() {
      t.true(can('chattr', ['-i', s.journal]), 'chattr -i');
      locked = '';
    },
  });
});

test.serial('out of file descriptors (ulimit -n 256, 300 distinct IDs): the server stays up and every ACKed line survives a restart', async (t) => {
  const s = await setup(t);
  const a = await serve(t, s.config(false), {}, 256);
  const by = await bystander(t, s.port);
  const ids = Array.from({ length: 300 }, (_, i) => `dev-${String(i).padStart(3, '0')}`);
  for (let i = 0; i < ids.length; i += 10) {
    await Promise.all(
      ids.slice(i, i + 10).map(async (id) => {
        const d = await Device.open(t, s.port, id);
        await d.send(`hello from ${id}`);
        d.close();
      }),
    );
  }
  await bystanderUnharmed(t, by, a);
  const capped = a.logs.find((r) => r.msg.startsWith('persist: fewer journal files kept open'));
  t.is(capped?.maxOpenFiles, 64, 'a quarter of the 256 descriptors at most for journals');
  const open = fs.readdirSync(`/proc/${a.proc.pid}/fd`).length;
  t.true(open < 256, `${open} descriptors open`);
  t.false(
    a.logs.some((r) => r.msg.startsWith('journal write failed')),
    'closing idle journals was enough: no device lost its persistence',
  );
  by.close();
  await kill(a);
  const b = await serve(t, s.config(true), s.reading, 256);
  await eventually(() => ids.every((id) => linesOf(s.record, id).length === 1), 30_000, 'all 300 lines read after the restart');
  for (const id of ids) t.deepEqual(linesOf(s.record, id), [`hello from ${id}`]);
  t.true(b.alive());
});

test.serial('out of file descriptors with an explicit cap above the limit (ulimit -n 64, 200 journals): idle files are closed, the cap is lowered, nothing is lost', async (t) => {
  const dir = tmpdir(t);
  const script = `
    const { FileStore } = require('./src/store');
    const logs = [];
    const logger = { debug() {}, info() {}, warn: (m) => logs.push(m), error: (m) => logs.push(m), child() { return logger; }, level: 'info' };
    const store = new FileStore({ dir: process.argv[1], maxOpenFiles: 1000, logger });
    const js = [];
    for (let i = 0; i < 200; i++) { js.push(store.attach('d' + i).journal); js[i].received(1, 'one of ' + i); }
    for (let i = 0; i < 200; i++) js[i].received(2, 'two of ' + i);
    process.stdout.write(JSON.stringify({ stats: store.stats(), logs }));
    store.closeAll();
  `;
  const r = spawnSync('bash', ['-c', `ulimit -n 64 && exec "$0" "$@"`, process.execPath, '-r', 'ts-node/register/transpile-only', '-e', script, dir], {
    cwd: ROOT,
    encoding: 'utf8',
    timeout: 60_000,
  });
  t.is(r.status, 0, r.stderr);
  const { stats, logs } = JSON.parse(r.stdout) as { stats: ReturnType<FileStore['stats']>; logs: string[] };
  t.true(logs.some((m) => m.startsWith('out of file descriptors')), logs.join('\n'));
  t.true(stats.maxOpenFiles < 64, `cap lowered to ${stats.maxOpenFiles}`);
  t.is(stats.writeFailures, 0);
  t.is(stats.degraded, 0);
  const again = new FileStore({ dir });
  const restored = again.restoreAll();
  t.is(restored.length, 200);
  for (const x of restored) t.deepEqual(x.restored.inbound, [`one of ${x.id.slice(1)}`, `two of ${x.id.slice(1)}`]);
  again.closeAll();
});
