/**
 * App scripts: one function run once per client ID with that ID's Connection
 * (the original's "one App instance per client"). A script may also export the
 * device half of the same exchange, which `tether sim` and `tether demo` run on
 * simulated devices.
 *
 *   export const clients = ['1', '2'];                       // optional
 *   export default async function (conn, ctx) { … }         // server half
 *   export async function device(client, ctx) { … }         // device half (optional)
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import { EventEmitter } from 'node:events';
import * as path from 'node:path';
import type { Client } from './client';
import type { Connection } from './connection';
import { checkInt, WriteOptions } from './endpoint';
import type { Fleet } from './fleet';
import { TetherError } from './errors';
import type { Logger } from './log';
import { throttledWarn } from './limits';
import type { Server } from './server';
import { preview } from './util';
import { typeScriptTarget } from './runtime';

export interface AppContext {
  /** The client ID this instance serves. */
  id: string;
  server: Server;
  log: Logger;
  /** Aborted when the server shuts down. */
  signal: AbortSignal;
  /** Another client's Connection, waiting until it has connected once. */
  clientConn(id: string): Promise<Connection>;
}

export interface DeviceContext {
  id: string;
  log: Logger;
  /** Aborted when the simulation stops. */
  signal: AbortSignal;
}

export type AppFn = (conn: Connection, ctx: AppContext) => unknown;
export type DeviceFn = (client: Client, ctx: DeviceContext) => unknown;

export interface LoadedApp {
  name: string;
  file: string;
  run: AppFn;
  device?: DeviceFn;
  clients: string[] | '*';
  /** Run for every device of this type instead of a list of IDs (needs a Fleet). */
  type?: string;
}

/**
 * Loads an app script. What it may look like (docs/porting.md, "App scripts"):
 * - TypeScript or ESM-style CommonJS: `export default fn`, `exports.default = fn`,
 *   optional `clients`, `type`, `device` exports;
 * - plain CommonJS: `module.exports = fn` (with `module.exports.clients = [...]`
 *   if wanted) or `module.exports = { default: fn, clients, device }`;
 * - an ES module `.mjs` (or `.js` under `"type": "module"`), loaded with Node's
 *   require(esm): everything but top-level await.
 * `app` is accepted as another name for the server half.
 */
export function loadApp(file: string, clients?: string[] | '*', type?: string): LoadedApp {
  const abs = path.resolve(file);
  const mod = requireApp(file, abs);
  // module.exports = fn: the function is the app, and its properties are the other exports.
  const exp = (typeof mod === 'function' ? Object.assign({ default: mod }, mod) : (mod ?? {})) as Record<string, unknown>;
  const run = (exp.default ?? exp.app) as unknown;
  if (typeof run !== 'function') {
    const has = Object.keys(exp).filter((k) => k !== '__esModule');
    throw new TetherError(
      'ERR_BAD_APP',
      `app ${file} exports no app function (it exports ${has.length ? has.join(', ') : 'nothing'}): ` +
        'give it a default export, `export default async function (conn, ctx) { … }`, or in plain JavaScript ' +
        '`module.exports = async function (conn, ctx) { … }`; it runs once per client ID',
    );
  }
  const own = exp.clients as string[] | '*' | undefined;
  if (own !== undefined && own !== '*' && !(Array.isArray(own) && own.every((id) => typeof id === 'string'))) {
    throw new TetherError('ERR_BAD_APP', `app ${file}: its "clients" export must be a list of client IDs or "*", not ${JSON.stringify(own)}`);
  }
  return {
    name: path.basename(file).replace(/\.[cm]?[jt]s$/, ''),
    file: abs,
    run: run as AppFn,
    device: typeof exp.device === 'function' ? (exp.device as DeviceFn) : undefined,
    clients: type !== undefined ? '*' : (clients ?? own ?? '*'),
    type: type ?? (typeof exp.type === 'string' ? exp.type : undefined),
  };
}

/** require() of an app script, with errors that say what to change instead of Node's require stack. */
function requireApp(file: string, abs: string): unknown {
  let resolved: string;
  try {
    resolved = require.resolve(abs);
  } catch {
    throw new TetherError('ERR_BAD_APP', `cannot find app script ${file} (resolved to ${abs}): check the path in apps[].script or --app`);
  }
  let target = resolved;
  if (/\.[cm]?ts$/.test(resolved)) {
    // Compiled tether: its own examples load compiled, other TypeScript through ts-node if installed (src/runtime.ts).
    let loadable: string | undefined;
    try {
      loadable = typeScriptTarget(resolved);
    } catch (e) {
      throw new TetherError('ERR_BAD_APP', `cannot load app ${file}: ${(e as Error).message}`);
    }
    if (loadable === undefined) {
      throw new TetherError(
        'ERR_BAD_APP',
        `app ${file} is TypeScript, and this tether runs without a TypeScript loader: write the app in JavaScript ` +
          '(module.exports = async function (conn, ctx) { … }, see docs/porting.md), compile it with tsc and give tether ' +
          `the .js file, or install ts-node and TypeScript 5 for it (cd ${path.dirname(resolved)} && npm install --save-dev ts-node typescript@5)`,
      );
    }
    target = loadable;
  }
  try {
    return require(target);
  } catch (e) {
    throw new TetherError('ERR_BAD_APP', `cannot load app ${file}: ${loadProblem(e as NodeJS.ErrnoException, resolved)}`);
  }
}

function loadProblem(e: NodeJS.ErrnoException, resolved: string): string {
  const first = String(e?.message ?? e).split('\n')[0]; // Node appends its require stack after the first line
  const stack = String(e?.stack ?? '');
  if (e?.code === 'MODULE_NOT_FOUND' || e?.code === 'ERR_MODULE_NOT_FOUND') {
    const what = /Cannot find (?:module|package) '([^']+)'/.exec(first)?.[1];
    if (!what) return `${first}: check what the app requires or imports`;
    if (what.startsWith('.') || path.isAbsolute(what)) return `it requires ${what}, which does not exist: fix that path in the app`;
    return `it needs the package ${what}, which is not installed: run \`npm install ${what}\` in the app's folder (or a folder above it)`;
  }
  if (e?.code === 'ERR_REQUIRE_ASYNC_MODULE') {
    return 'it uses top-level await, which tether cannot load: move the awaits into the app function (or a function it calls)';
  }
  if (e instanceof SyntaxError && /import statement outside a module|Unexpected token 'export'/.test(first)) {
    return 'it is an ES module (import/export) in a file Node reads as CommonJS: rename it to .mjs, or use require() and module.exports = … instead';
  }
  // Where in the app it went wrong: a SyntaxError's stack starts with "file:line"; an exception names a frame in the file.
  const esc = resolved.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  const at = new RegExp(`${esc}:(\\d+)(?::(\\d+))?`).exec(stack);
  const where = at ? `${path.basename(resolved)}:${at[1]}${at[2] ? `:${at[2]}` : ''}` : path.basename(resolved);
  if (e instanceof SyntaxError) return `${e.name}: ${first} (${where}; \`node --check ${resolved}\` shows the line): fix the app's syntax`;
  return `it threw while loading (${where}): ${first}: code at the top level of an app runs once at start, so move work that can fail into the app function`;
}

/**
 * A line parsed as JSON, or undefined (with a throttled warning naming the
 * device) when it is not JSON: what an app should do with a line it cannot
 * read is log it and go on, not fail.
 */
export function parseJsonLine<T = unknown>(line: string, log: Logger): T | undefined {
  try {
    return JSON.parse(line) as T;
  } catch (e) {
    throttledWarn(log, 'skipped a line that is not JSON', { line: preview(Buffer.from(line.trimEnd())), error: (e as Error).message });
    return undefined;
  }
}

export interface AppRestartOptions {
  /** ms before a failed app instance is started again. Default 1000. */
  initialDelay?: number;
  /** Longest wait between restarts; the wait doubles with each failure in a row. Default 60000. */
  maxDelay?: number;
  /** An instance that ran this many ms before failing restarts after initialDelay again. Default 60000. */
  resetAfter?: number;
  /**
   * Trace which app instance started each timer and promise (AsyncLocalStorage),
   * so an error escaping from them costs only that instance. It costs every
   * promise of the process a little (the benchmark's saturated echo loses 25 to
   * 70 % of its rate; a fleet of boards sending a line a second does not notice).
   * false: such errors are logged and counted but restart nothing. Default true.
   */
  trace?: boolean;
}

export const APP_RESTART_DEFAULTS = { initialDelay: 1000, maxDelay: 60_000, resetAfter: 60_000, trace: true } as const;

/** running; restarting (failed, waiting out its backoff); finished (returned); stopped (shutdown or its Connection closed). */
export type AppState = 'running' | 'restarting' | 'finished' | 'stopped';

/** One app instance for one client ID, as the dashboard and the API show it. */
export interface AppStatus {
  app: string;
  state: AppState;
  /** Failures so far (throws, rejections, errors of its background tasks). */
  failures: number;
  /** Message and time (ms since the epoch) of the last failure. */
  lastError: string | null;
  lastFailure: number | null;
  /** When it will be started again (ms since the epoch), while restarting. */
  restartAt: number | null;
}

/** Which app instance the running code belongs to; follows its timers and promises. */
interface Running {
  inst: Instance;
  gen: number;
}
const current = new AsyncLocalStorage<Running>();

/** Where an error is reported when no app instance can be blamed (counted as tether_uncaught_errors_total). */
let unattributed = 0;
export function uncaughtErrors(): number {
  return unattributed;
}

class Instance {
  /** Bumped at every (re)start; leftovers of an older generation are not this instance any more. */
  gen = 0;
  state: AppState = 'running';
  failures = 0;
  lastError: string | null = null;
  lastFailure: number | null = null;
  restartAt: number | null = null;
  private startedAt = 0;
  private streak = 0;
  private ctl = new AbortController();
  private timer: NodeJS.Timeout | null = null;
  private listeners: Array<[string | symbol, (...a: unknown[]) => void]> = [];

  constructor(
    readonly app: LoadedApp,
    readonly conn: Connection,
    private readonly runner: AppRunner,
    private readonly log: Logger,
  ) {}

  status(): AppStatus {
    const { state, failures, lastError, lastFailure, restartAt } = this;
    return { app: this.app.name, state, failures, lastError, lastFailure, restartAt };
  }

  start(): void {
    const gen = ++this.gen;
    this.ctl = new AbortController();
    const signal = AbortSignal.any([this.runner.signal, this.ctl.signal]);
    this.state = 'running';
    this.restartAt = null;
    this.startedAt = Date.now();
    const ctx: AppContext = {
      id: this.conn.id,
      server: this.runner.server,
      log: this.log,
      signal,
      clientConn: (id) => this.runner.server.clientConn(id, signal),
    };
    const view = connView(
      this.conn,
      signal,
      (ev, fn) => this.listeners.push([ev, fn]),
      (ev, fn) => {
        const i = this.listeners.findIndex(([e, f]) => e === ev && f === fn);
        if (i >= 0) this.listeners.splice(i, 1);
      },
    );
    const call = () => {
      try {
        return Promise.resolve(this.app.run(view, ctx));
      } catch (e) {
        return Promise.reject(e);
      }
    };
    const run = this.runner.restart.trace ? current.run({ inst: this, gen }, call) : call();
    this.runner.track(
      run.then(
        () => this.ended(gen, null),
        (e: unknown) => this.ended(gen, e),
      ),
    );
    this.runner.changed(this);
  }

  private ended(gen: number, err: unknown): void {
    if (gen !== this.gen || this.state !== 'running') return;
    if (this.runner.signal.aborted || this.conn.isClosed) {
      this.state = 'stopped';
      this.retire();
      this.runner.changed(this);
      return;
    }
    if (err !== null) {
      this.fail(gen, err, 'the app function threw or its promise rejected');
      return;
    }
    this.state = 'finished';
    this.retire();
    this.log.info('app returned: this client ID has no app instance now', { hint: 'its lines are accepted and shown, as for a device without an app' });
    this.runner.changed(this);
  }

  /** An error of generation `gen` of this instance: it is stopped and started again after a backoff. */
  fail(gen: number, err: unknown, how: string): void {
    if (gen !== this.gen || this.state !== 'running') {
      this.log.debug('error from an app instance already stopped', { how, error: describeError(err) });
      return;
    }
    const ran = Date.now() - this.startedAt;
    const o = this.runner.restart;
    this.streak = ran >= o.resetAfter ? 1 : this.streak + 1;
    const delay = Math.min(o.maxDelay, o.initialDelay * 2 ** (this.streak - 1));
    this.failures++;
    this.runner.failed(this.app.name);
    this.lastError = describeError(err);
    this.lastFailure = Date.now();
    this.state = 'restarting';
    this.restartAt = Date.now() + delay;
    this.retire();
    this.log.error('app failed: this instance is stopped and starts again after a pause; other devices are not affected', {
      how,
      error: err instanceof Error ? (err.stack ?? err.message) : String(err),
      failures: this.failures,
      restartInMs: delay,
      hint: 'fix the app (a line it cannot handle should be logged and skipped); its unread lines wait for the new instance',
    });
    this.timer = setTimeout(() => {
      this.timer = null;
      if (this.runner.signal.aborted || this.conn.isClosed) {
        this.state = 'stopped';
        this.runner.changed(this);
        return;
      }
      this.log.info('app started again', { failures: this.failures });
      this.start();
    }, delay);
    this.timer.unref?.();
    this.runner.changed(this);
  }

  /** Ends this generation: its signal aborts, its readers and writers are refused, its listeners removed. */
  private retire(): void {
    this.gen++;
    this.ctl.abort(new Error('app instance stopped'));
    for (const [ev, fn] of this.listeners.splice(0)) this.conn.removeListener(ev, fn);
  }

  stop(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    if (this.state === 'running' || this.state === 'restarting') this.state = 'stopped';
    this.retire();
  }
}

function describeError(err: unknown): string {
  return err instanceof Error ? `${err.name}: ${err.message}` : String(err);
}

const LISTEN = new Set<string | symbol>(['on', 'addListener', 'once', 'prependListener', 'prependOnceListener']);

/**
 * What one app instance sees as its Connection: the Connection itself, except
 * that reads and writes end with the instance (so a failed instance's leftovers
 * cannot steal lines from its successor) and its listeners are removed then.
 */
function connView(
  conn: Connection,
  signal: AbortSignal,
  track: (ev: string | symbol, fn: (...a: unknown[]) => void) => void,
  untrack: (ev: string | symbol, fn: (...a: unknown[]) => void) => void,
): Connection {
  const stopped = () => new TetherError('ERR_ABORTED', 'this app instance was stopped (it failed, or the server is shutting down); a new instance has the connection');
  const view: Connection = new Proxy(conn, {
    get(target, prop) {
      // The app's own signal counts too; either ends the wait.
      if (prop === 'readline') return (own?: AbortSignal) => target.readline(own ? AbortSignal.any([own, signal]) : signal);
      if (prop === 'take') return (own?: AbortSignal) => target.take(own ? AbortSignal.any([own, signal]) : signal);
      if (prop === 'off' || prop === 'removeListener') {
        return (ev: string | symbol, fn: (...a: unknown[]) => void) => {
          untrack(ev, fn);
          target.removeListener(ev, fn);
          return view;
        };
      }
      if (prop === 'write') return (line: string, opts?: WriteOptions) => (signal.aborted ? Promise.reject(stopped()) : target.write(line, opts));
      if (prop === Symbol.asyncIterator) {
        return async function* lines(): AsyncGenerator<string, void, undefined> {
          for (;;) {
            try {
              yield await target.readline(signal);
            } catch (e) {
              if (e instanceof TetherError && (e.code === 'ERR_CLOSED' || (e.code === 'ERR_ABORTED' && signal.aborted))) return;
              throw e;
            }
          }
        };
      }
      if (LISTEN.has(prop)) {
        return (ev: string | symbol, fn: (...a: unknown[]) => void) => {
          track(ev, fn);
          (target[prop as 'on'] as (e: string | symbol, f: (...a: unknown[]) => void) => unknown).call(target, ev, fn);
          return view;
        };
      }
      const v = Reflect.get(target, prop, target) as unknown;
      return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
    },
  });
  return view;
}

/**
 * Runs apps against a server: one instance per client ID, started when that ID
 * first connects. An instance that fails (throws, rejects, or a timer or
 * promise it started fails unhandled, once guardProcess() is on) is stopped,
 * logged and counted, and started again after a backoff (AppRestartOptions);
 * other devices and the server carry on. Lines of devices no app claims are
 * accepted (see acceptUnclaimed()).
 */
export class AppRunner extends EventEmitter {
  private readonly stop = new AbortController();
  private readonly running = new Set<Promise<void>>();
  private readonly apps: LoadedApp[] = [];
  private readonly instances = new Map<string, Instance[]>();
  /** Failures so far per app name (tether_app_failures_total). */
  readonly failures = new Map<string, number>();
  readonly restart: Required<AppRestartOptions>;

  constructor(
    readonly server: Server,
    private readonly log: Logger,
    private readonly fleet?: Fleet,
    restart: AppRestartOptions = {},
  ) {
    super();
    this.restart = {
      initialDelay: checkInt('apps.restart.initialDelay', restart.initialDelay ?? APP_RESTART_DEFAULTS.initialDelay, 0),
      maxDelay: checkInt('apps.restart.maxDelay', restart.maxDelay ?? APP_RESTART_DEFAULTS.maxDelay, 0),
      resetAfter: checkInt('apps.restart.resetAfter', restart.resetAfter ?? APP_RESTART_DEFAULTS.resetAfter, 0),
      trace: restart.trace ?? APP_RESTART_DEFAULTS.trace,
    };
    fleet?.setAppStatus((id) => this.statusOf(id));
  }

  /** Aborted when the runner closes. */
  get signal(): AbortSignal {
    return this.stop.signal;
  }

  add(app: LoadedApp): void {
    const log = this.log.child({ app: app.name });
    if (app.type !== undefined && !this.fleet) {
      throw new TetherError('ERR_BAD_APP', `app ${app.file} is bound to type "${app.type}": the runner needs the fleet`);
    }
    this.apps.push(app);
    if (app.clients === '*') {
      const each = (conn: Connection) => {
        if (app.type === undefined || this.fleet!.typeOf(conn) === app.type) this.startOne(app, conn, log);
      };
      for (const c of this.server.connections()) each(c);
      this.server.on('connection', each);
      this.stop.signal.addEventListener('abort', () => this.server.off('connection', each), { once: true });
      log.info(app.type === undefined ? 'app runs for every client ID' : 'app runs for every device of its type', { type: app.type });
      return;
    }
    log.info('app waiting for its clients', { clients: app.clients });
    for (const id of app.clients) {
      this.track(
        this.server.clientConn(id, this.stop.signal).then(
          (conn) => this.startOne(app, conn, log),
          () => {},
        ),
      );
    }
  }

  /**
   * Devices that no app claims have their lines accepted: ACKed as they come,
   * shown in the fleet view (recent lines, events, API, WebSocket) and not kept
   * for readline(). Call after add()ing every app; it also covers devices whose
   * app returned. A device whose app failed is not drained: its lines wait for
   * the restarted instance.
   */
  acceptUnclaimed(): void {
    const each = (conn: Connection) => {
      if (!this.apps.some((a) => this.claims(a, conn))) this.drain(conn, 'no app is bound to this client ID');
    };
    for (const c of this.server.connections()) each(c);
    this.server.on('connection', each);
    this.stop.signal.addEventListener('abort', () => this.server.off('connection', each), { once: true });
  }

  private claims(app: LoadedApp, conn: Connection): boolean {
    if (app.clients !== '*') return app.clients.includes(conn.id);
    return app.type === undefined || this.fleet?.typeOf(conn) === app.type;
  }

  private drain(conn: Connection, why: string): void {
    if (conn.hasConsumer || conn.isClosed) return; // e.g. the MQTT bridge takes its lines
    conn.setConsumer(ACCEPT);
    while (conn.buffered > 0) void conn.readline();
    this.log.debug('lines of this device are accepted and shown, not kept for an app', { client: conn.id, why });
  }

  /**
   * Routes errors that escape app code (an unhandled rejection, an exception
   * thrown from a timer or event handler) to the app instance whose code
   * started it, instead of letting them end the process. Errors no instance
   * can be blamed for are logged and counted; the server carries on. Call once
   * per process (the CLI does).
   */
  guardProcess(): void {
    const onFault = (err: unknown, how: string) => {
      const r = current.getStore();
      if (r) {
        r.inst.fail(r.gen, err, how);
        return;
      }
      unattributed++;
      this.log.error('an error escaped outside any app instance: logged, the server carries on', {
        how,
        error: err instanceof Error ? (err.stack ?? err.message) : String(err),
        hint: 'this is a bug in tether or in a library it uses: please report it with this record',
      });
    };
    process.on('unhandledRejection', (reason) => onFault(reason, 'unhandled promise rejection'));
    process.on('uncaughtException', (err) => onFault(err, 'uncaught exception'));
  }

  /** The app instances of one client ID. */
  statusOf(id: string): AppStatus[] {
    return (this.instances.get(id) ?? []).map((i) => i.status());
  }

  /** Instances by state, over every client ID. */
  counts(): Record<AppState, number> {
    const n: Record<AppState, number> = { running: 0, restarting: 0, finished: 0, stopped: 0 };
    for (const list of this.instances.values()) for (const i of list) n[i.state]++;
    return n;
  }

  private startOne(app: LoadedApp, conn: Connection, log: Logger): void {
    const inst = new Instance(app, conn, this, log.child({ client: conn.id }));
    const list = this.instances.get(conn.id) ?? [];
    list.push(inst);
    this.instances.set(conn.id, list);
    conn.once('close', () => inst.stop());
    inst.start();
  }

  /** Used by instances. */
  failed(app: string): void {
    this.failures.set(app, (this.failures.get(app) ?? 0) + 1);
  }

  /** Used by instances: a state changed (the fleet view shows it). */
  changed(inst: Instance): void {
    const id = inst.conn.id;
    if (inst.state === 'finished' && !(this.instances.get(id) ?? []).some((i) => i.state === 'running' || i.state === 'restarting')) {
      this.drain(inst.conn, 'its app returned');
    }
    const status = inst.status();
    this.fleet?.appChanged(id, status);
    this.emit('state', id, status);
  }

  /** Used by instances. */
  track(p: Promise<void>): void {
    this.running.add(p);
    void p.finally(() => this.running.delete(p));
  }

  /**
   * Signals every app to stop; resolves when they have returned (bounded by `ms`).
   * Close the server too so apps blocked in readline() return.
   */
  async close(ms = 2000): Promise<void> {
    this.stop.abort();
    for (const list of this.instances.values()) for (const i of list) i.stop();
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([Promise.allSettled([...this.running]), new Promise((r) => (timer = setTimeout(r, ms)))]);
    clearTimeout(timer);
  }
}

const RESOLVED = Promise.resolve();
/** The consumer of devices nobody reads: every line is taken at once. */
const ACCEPT = (): Promise<void> => RESOLVED;
