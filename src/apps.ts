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
import * as path from 'node:path';
import type { Client } from './client';
import type { Connection } from './connection';
import type { Fleet } from './fleet';
import { TetherError } from './errors';
import type { Logger } from './log';
import type { Server } from './server';

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

/** Loads an app script (TypeScript or JavaScript). */
export function loadApp(file: string, clients?: string[] | '*', type?: string): LoadedApp {
  const abs = path.resolve(file);
  let mod: Record<string, unknown>;
  try {
    mod = require(abs);
  } catch (e) {
    throw new TetherError('ERR_BAD_APP', `cannot load app ${file}: ${(e as Error).message}`);
  }
  const run = (mod.default ?? mod.app) as unknown;
  if (typeof run !== 'function') {
    throw new TetherError(
      'ERR_BAD_APP',
      `app ${file} must export a default function (conn, ctx) => …, run once per client ID`,
    );
  }
  const own = mod.clients as string[] | '*' | undefined;
  return {
    name: path.basename(file).replace(/\.[jt]s$/, ''),
    file: abs,
    run: run as AppFn,
    device: typeof mod.device === 'function' ? (mod.device as DeviceFn) : undefined,
    clients: type !== undefined ? '*' : (clients ?? own ?? '*'),
    type: type ?? (typeof mod.type === 'string' ? mod.type : undefined),
  };
}

/** Runs apps against a server: one instance per client ID, started when that ID first connects. */
export class AppRunner {
  private readonly stop = new AbortController();
  private readonly running = new Set<Promise<void>>();

  constructor(
    private readonly server: Server,
    private readonly log: Logger,
    private readonly fleet?: Fleet,
  ) {}

  add(app: LoadedApp): void {
    const log = this.log.child({ app: app.name });
    if (app.type !== undefined && !this.fleet) {
      throw new TetherError('ERR_BAD_APP', `app ${app.file} is bound to type "${app.type}": the runner needs the fleet`);
    }
    if (app.clients === '*') {
      const each = (conn: Connection) => {
        if (app.type === undefined || this.fleet!.typeOf(conn) === app.type) this.start(app, conn, log);
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
          (conn) => this.start(app, conn, log),
          () => {},
        ),
      );
    }
  }

  private start(app: LoadedApp, conn: Connection, log: Logger): void {
    const ctx: AppContext = {
      id: conn.id,
      server: this.server,
      log: log.child({ client: conn.id }),
      signal: this.stop.signal,
      clientConn: (id) => this.server.clientConn(id, this.stop.signal),
    };
    this.track(
      (async () => {
        try {
          await app.run(conn, ctx);
        } catch (e) {
          if (this.stop.signal.aborted || conn.isClosed) return; // shutting down
          ctx.log.error('app failed; this client ID has no app instance until restart', {
            error: (e as Error).stack ?? String(e),
          });
        }
      })(),
    );
  }

  private track(p: Promise<void>): void {
    this.running.add(p);
    p.finally(() => this.running.delete(p));
  }

  /**
   * Signals every app to stop; resolves when they have returned (bounded by `ms`).
   * Close the server too so apps blocked in readline() return.
   */
  async close(ms = 2000): Promise<void> {
    this.stop.abort();
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      Promise.allSettled([...this.running]),
      new Promise((r) => (timer = setTimeout(r, ms))),
    ]);
    clearTimeout(timer);
  }
}
