/**
 * Runs MicroPython device code inside the official MicroPython WebAssembly build,
 * with test stand-ins for the board modules a client needs (socket, network,
 * machine: test/micropython/stubs/). Sockets are real Node TCP sockets.
 *
 * Each startMicroPython() gets its own worker thread (micropython-worker.js):
 * the wasm glue keeps its runtime in realm globals, so two interpreters in one
 * thread corrupt each other. Values cross as JSON; bytes arrive as Buffers.
 *
 * The wasm asyncio has no asyncio.run() (start work with asyncio.create_task in
 * run()), and a blocking wait (select.poll(ms > 0), time.sleep) stops the whole
 * interpreter, sockets included: poll with 0 and await asyncio.sleep_ms instead.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { Worker } from 'node:worker_threads';

const STUBS_DIR = path.resolve(__dirname, '../micropython/stubs');
const HARNESS_PY = path.resolve(__dirname, '../micropython/_tether_harness.py');
const CLIENT_DIR = path.resolve(__dirname, '../../clients/micropython');
const WORKER = path.resolve(__dirname, 'micropython-worker.js');

export interface StartOptions {
  /** MicroPython GC heap in bytes (default 1 MiB). */
  heapsize?: number;
  /** Extra files: absolute paths as given, relative ones under /lib. */
  files?: Record<string, string>;
  /** Called with each line the interpreter prints to stdout. */
  onStdout?(line: string): void;
  /** Called with each stderr line (tracebacks of failed asyncio tasks go there). */
  onStderr?(line: string): void;
  /** Where the client's .py files come from (default clients/micropython); null copies none. */
  clientDir?: string | null;
  /** machine.unique_id() and the WLAN MAC, as 12 hex digits (default: random per interpreter). */
  uniqueId?: string;
  wifi?: {
    /** Whether the access point is reachable at start (default true). */
    up?: boolean;
    /** How long a join takes (default 50 ms). */
    connectDelayMs?: number;
    /** Whether active(True) auto-joins with "stored" credentials, as an ESP8266 (default true). */
    storedCredentials?: boolean;
  };
}

export interface PinRecord {
  /** Current level (0 or 1). */
  value: number;
  /** Writes after construction (value(), on(), off(), __call__). */
  writes: number;
  /** Writes that changed the level. */
  toggles: number;
}

export interface WifiControl {
  /** Makes the access point reachable (true) or not (false); going down drops the link. */
  setUp(up: boolean): void;
  readonly up: boolean;
  readonly active: boolean;
  readonly connected: boolean;
  /** WLAN.connect() calls. */
  readonly connects: number;
  /** WLAN.disconnect() calls. */
  readonly disconnects: number;
}

export interface MicroPython {
  /** Runs code (top-level await allowed) in __main__; tasks it creates keep running. */
  run(code: string): Promise<unknown>;
  /** Calls a Python callable by name ('f' in __main__, or 'module.f'), awaiting a coroutine. */
  call(name: string, ...args: unknown[]): Promise<unknown>;
  /** Evaluates an expression in __main__, awaiting a coroutine. */
  eval(expr: string): Promise<unknown>;
  readonly stdout: string[];
  readonly stderr: string[];
  /** Resolves with the first stdout line (already printed or later) matching pattern. */
  waitForLine(pattern: RegExp | string, timeoutMs?: number): Promise<string>;
  readonly wifi: WifiControl;
  /** Pins written by the code under test, keyed by String(id). */
  readonly pins: Record<string, PinRecord>;
  /** Date.now() of each WDT.feed(). */
  readonly wdtFeeds: number[];
  /** Timeout given to machine.WDT(), or null if none was created. */
  readonly wdtTimeoutMs: number | null;
  /** machine.reset()/soft_reset()/deepsleep() calls, in order. */
  readonly resets: string[];
  /** Sockets the code opened and has not closed yet. */
  sockets(): number;
  /** Destroys every socket and timer of this interpreter and ends it. Idempotent. */
  close(): Promise<void>;
}

export class PythonError extends Error {
  override name = 'PythonError';
  constructor(
    readonly type: string,
    message: string,
  ) {
    super(message);
  }
}

type FromWorker =
  | { t: 'ready' }
  | { t: 'fatal'; error: { type: string; message: string } }
  | { t: 'stdout' | 'stderr'; line: string }
  | { t: 'result'; id: number; ok: true; json: string }
  | { t: 'result'; id: number; ok: false; error: { type: string; message: string } }
  | { t: 'sockets'; open: number }
  | { t: 'wifi'; up: boolean; active: boolean; connected: boolean; connects: number; disconnects: number }
  | { t: 'pin'; id: string; value: number; writes: number; toggles: number }
  | { t: 'wdt-start'; timeoutMs: number }
  | { t: 'wdt-feed'; time: number }
  | { t: 'reset'; kind: string }
  | { t: 'closed'; open: number };

function collectFiles(opts: StartOptions): Array<[string, string]> {
  const files: Array<[string, string]> = [];
  const addDir = (dir: string, dest: string) => {
    if (!fs.existsSync(dir)) return;
    for (const name of fs.readdirSync(dir).sort()) {
      const full = path.join(dir, name);
      if (name.endsWith('.py') && fs.statSync(full).isFile()) {
        files.push([`${dest}/${name}`, fs.readFileSync(full, 'utf8')]);
      }
    }
  };
  addDir(STUBS_DIR, '/lib');
  files.push(['/lib/_tether_harness.py', fs.readFileSync(HARNESS_PY, 'utf8')]);
  const clientDir = opts.clientDir === undefined ? CLIENT_DIR : opts.clientDir;
  if (clientDir) {
    addDir(clientDir, '/lib');
    addDir(path.join(clientDir, 'examples'), '/lib/examples');
  }
  for (const [p, text] of Object.entries(opts.files ?? {})) {
    files.push([p.startsWith('/') ? p : `/lib/${p}`, text]);
  }
  return files;
}

/** JSON from the worker, with {"__bytes__": hex} turned into Buffers. */
function parseValue(json: string): unknown {
  return JSON.parse(json, (_k, v: unknown) => {
    if (v && typeof v === 'object' && !Array.isArray(v)) {
      const keys = Object.keys(v);
      if (keys.length === 1 && keys[0] === '__bytes__') return Buffer.from((v as { __bytes__: string }).__bytes__, 'hex');
    }
    return v;
  });
}

export async function startMicroPython(opts: StartOptions = {}): Promise<MicroPython> {
  const uniqueId = opts.uniqueId ?? randomBytes(6).toString('hex');
  if (!/^([0-9a-fA-F]{2})+$/.test(uniqueId)) throw new Error('uniqueId must be hex bytes');

  const worker = new Worker(WORKER, {
    workerData: {
      heapsize: opts.heapsize ?? 1024 * 1024,
      files: collectFiles(opts),
      uniqueIdHex: uniqueId,
      wifi: opts.wifi ?? {},
    },
    stdout: false,
    stderr: false,
  });

  const stdout: string[] = [];
  const stderr: string[] = [];
  const lineWaiters = new Set<(line: string) => boolean>();
  const pending = new Map<number, { resolve(v: unknown): void; reject(e: Error): void }>();
  const pins: Record<string, PinRecord> = {};
  const wdtFeeds: number[] = [];
  const resets: string[] = [];
  const wifiState = {
    up: opts.wifi?.up !== false,
    active: false,
    connected: false,
    connects: 0,
    disconnects: 0,
  };
  let wdtTimeoutMs: number | null = null;
  let openSockets = 0;
  let nextId = 1;
  let dead: Error | null = null;
  let closed = false;
  let onClosed: (() => void) | null = null;

  // The worker keeps the test process alive only while a request is in flight,
  // so a test that forgets close() still lets ava finish.
  const refresh = () => (pending.size > 0 && !dead ? worker.ref() : worker.unref());

  const fail = (err: Error) => {
    if (dead) return;
    dead = err;
    for (const p of pending.values()) p.reject(err);
    pending.clear();
    refresh();
  };

  let ready!: () => void;
  let notReady!: (e: Error) => void;
  const started = new Promise<void>((res, rej) => {
    ready = res;
    notReady = rej;
  });

  worker.on('message', (m: FromWorker) => {
    switch (m.t) {
      case 'ready':
        ready();
        break;
      case 'fatal':
        notReady(new PythonError(m.error.type, m.error.message));
        fail(new Error(`MicroPython worker failed: ${m.error.message}`));
        break;
      case 'stdout':
        stdout.push(m.line);
        opts.onStdout?.(m.line);
        for (const w of [...lineWaiters]) if (w(m.line)) lineWaiters.delete(w);
        break;
      case 'stderr':
        stderr.push(m.line);
        opts.onStderr?.(m.line);
        break;
      case 'result': {
        const p = pending.get(m.id);
        if (!p) break;
        pending.delete(m.id);
        refresh();
        if (m.ok) {
          try {
            p.resolve(parseValue(m.json));
          } catch (e) {
            p.reject(e as Error);
          }
        } else {
          p.reject(new PythonError(m.error.type, m.error.message));
        }
        break;
      }
      case 'sockets':
        openSockets = m.open;
        break;
      case 'wifi':
        Object.assign(wifiState, { up: m.up, active: m.active, connected: m.connected, connects: m.connects, disconnects: m.disconnects });
        break;
      case 'pin':
        pins[m.id] = { value: m.value, writes: m.writes, toggles: m.toggles };
        break;
      case 'wdt-start':
        wdtTimeoutMs = m.timeoutMs;
        break;
      case 'wdt-feed':
        wdtFeeds.push(m.time);
        break;
      case 'reset':
        resets.push(m.kind);
        break;
      case 'closed':
        openSockets = m.open;
        onClosed?.();
        break;
    }
  });
  worker.on('error', (err) => {
    notReady(err);
    fail(err);
  });
  worker.on('exit', (code) => {
    const err = new Error(`MicroPython worker exited (code ${code})`);
    notReady(err);
    fail(err);
  });

  const request = (msg: Record<string, unknown>): Promise<unknown> => {
    if (closed) return Promise.reject(new Error('MicroPython harness is closed'));
    if (dead) return Promise.reject(dead);
    const id = nextId++;
    return new Promise((resolve, reject) => {
      pending.set(id, { resolve, reject });
      refresh();
      worker.postMessage({ ...msg, id });
    });
  };

  const close = async (): Promise<void> => {
    if (closed) return;
    closed = true;
    for (const p of pending.values()) p.reject(new Error('MicroPython harness closed'));
    pending.clear();
    if (!dead) {
      // Let the worker destroy its sockets and timers itself; terminate() regardless.
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, 2000);
        onClosed = () => {
          clearTimeout(t);
          resolve();
        };
        worker.ref();
        worker.postMessage({ t: 'close' });
      });
    }
    await worker.terminate();
    openSockets = 0;
    for (const w of lineWaiters) w('\u0000closed');
    lineWaiters.clear();
  };

  try {
    worker.ref();
    await started;
    refresh();
  } catch (err) {
    await worker.terminate();
    throw err;
  }

  const wifi: WifiControl = {
    setUp(up: boolean) {
      wifiState.up = up;
      if (!closed && !dead) worker.postMessage({ t: 'wifi-up', up });
    },
    get up() {
      return wifiState.up;
    },
    get active() {
      return wifiState.active;
    },
    get connected() {
      return wifiState.connected;
    },
    get connects() {
      return wifiState.connects;
    },
    get disconnects() {
      return wifiState.disconnects;
    },
  };

  return {
    run: (code) => request({ t: 'run', code }),
    call: (name, ...args) => request({ t: 'call', name, args }),
    eval: (expr) => request({ t: 'eval', expr }),
    stdout,
    stderr,
    waitForLine(pattern, timeoutMs = 10_000) {
      const test = (line: string) => (typeof pattern === 'string' ? line.includes(pattern) : pattern.test(line));
      const seen = stdout.find(test);
      if (seen !== undefined) return Promise.resolve(seen);
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          lineWaiters.delete(waiter);
          reject(new Error(`no stdout line matching ${String(pattern)} within ${timeoutMs} ms`));
        }, timeoutMs);
        const waiter = (line: string) => {
          if (line === '\u0000closed') {
            clearTimeout(timer);
            reject(new Error('MicroPython harness closed'));
            return true;
          }
          if (!test(line)) return false;
          clearTimeout(timer);
          resolve(line);
          return true;
        };
        lineWaiters.add(waiter);
      });
    },
    wifi,
    pins,
    wdtFeeds,
    get wdtTimeoutMs() {
      return wdtTimeoutMs;
    },
    resets,
    sockets: () => openSockets,
    close,
  };
}
