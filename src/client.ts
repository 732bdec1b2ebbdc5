/**
 * The device side of the protocol in Node: what a board does, for simulators,
 * tests and Linux boards. Same behaviour as the original MicroPython client,
 * except that a refused first connect is retried with backoff instead of giving up.
 */
import { nanoid } from 'nanoid';
import * as net from 'node:net';
import * as tls from 'node:tls';
import { checkSecret } from './auth';
import { Endpoint, EndpointOptions } from './endpoint';
import { TetherError } from './errors';
import type { Link } from './link';
import { TcpLink } from './transports/tcp';
import { deferred, Deferred, sleep } from './util';

export interface ClientOptions extends EndpointOptions {
  /** This device's client ID (no `\n`). */
  id: string;
  /** Server address. Default `127.0.0.1`. */
  host?: string;
  /** Server port. Default 8123. */
  port?: number;
  /**
   * Several gateways to use in turn instead of host/port: `"host:port"` strings or
   * `{ host, port }`. The client stays with one until `failover` attempts in a row
   * fail there, then moves to the next (wrapping around). Default: [host:port].
   */
  servers?: Array<string | { host: string; port?: number }>;
  /** Failed attempts in a row (refused, unreachable, closed before the link came up) before moving to the next server. Default 3. */
  failover?: number;
  /** The device's secret when the server checks them (sent as `id@secret` in the ID line). Default: none. */
  secret?: string;
  /**
   * Announce a boot id (random, one per Client object) in the ID line as
   * `id##type##{"boot": "…"}`, so a tether server with `idLineTypes` on can tell
   * a resend of this client's first message (mid 0) from a restart even across
   * links. Only for tether servers with idLineTypes: any other server would
   * take the whole line as the client ID. Default false.
   */
  announceBoot?: boolean;
  /**
   * Connect with TLS: true (verify the server against the system CAs), or Node
   * `tls.connect` options (`ca` to trust your own CA, `cert`/`key` for a client
   * certificate, `servername`). Default: plain TCP.
   */
  tls?: boolean | tls.ConnectionOptions;
  /** ms to wait after an outage before reconnecting (the original waits 2 × timeout). Default 2 × timeout. */
  reconnectDelay?: number;
  /** ms to wait after a failed connect attempt; doubles up to `retryMax`. Default 500. */
  retryMin?: number;
  /** Longest wait between failed connect attempts. Default 30000. */
  retryMax?: number;
  /** false: `connect()` rejects if the very first attempt fails (the original's behaviour). Default true. */
  retry?: boolean;
  /**
   * Opens one link to the server. Default: a TCP connection to host:port. The
   * mesh emulator passes its own, so a simulated mesh node runs this same code.
   */
  dial?: () => Promise<Link>;
}

export class Client extends Endpoint {
  readonly id: string;
  /** The servers to try, in order. */
  readonly servers: ReadonlyArray<{ host: string; port: number }>;
  private current = 0;
  private failedHere = 0;
  private readonly failover: number;
  private readonly reconnectDelay: number;
  private readonly retryMin: number;
  private readonly retryMax: number;
  private readonly retry: boolean;
  private readonly dialLink: () => Promise<Link>;
  private readonly stop = new AbortController();
  private running: Promise<void> | null = null;
  private linkGone: Deferred<boolean> | null = null;
  private firstFailure: Deferred<void> = deferred();
  /** What the client sends first: its ID, with the secret and declared type if any. */
  private readonly idLine: string;
  private readonly tlsOpts: tls.ConnectionOptions | null;
  /** Connect attempts that failed (refused, unreachable, closed before the first line). */
  failedAttempts = 0;

  constructor(opts: ClientOptions) {
    if (typeof opts.id !== 'string' || opts.id.length === 0 || opts.id.includes('\n')) {
      throw new TetherError('ERR_BAD_CONFIG', `client id must be a non-empty string without "\\n", got ${JSON.stringify(opts.id)}`);
    }
    super({ ...opts, logger: opts.logger?.child({ device: opts.id }) });
    this.id = opts.id;
    if (opts.secret !== undefined) checkSecret(opts.secret);
    const announced = opts.announceBoot ? withBootId(opts.id, nanoid(10)) : opts.id;
    const typeAt = announced.indexOf('##');
    this.idLine =
      opts.secret === undefined ? announced : typeAt < 0 ? `${announced}@${opts.secret}` : `${announced.slice(0, typeAt)}@${opts.secret}${announced.slice(typeAt)}`;
    this.tlsOpts = opts.tls === true ? {} : opts.tls || null;
    const defaultPort = opts.port ?? 8123;
    const list = opts.servers && opts.servers.length > 0 ? opts.servers : [{ host: opts.host ?? '127.0.0.1', port: defaultPort }];
    this.servers = list.map((s) => parseServer(s, defaultPort));
    this.failover = opts.failover ?? 3;
    if (!Number.isInteger(this.failover) || this.failover < 1) throw new TetherError('ERR_BAD_CONFIG', `failover must be a whole number >= 1, got ${opts.failover}`);
    this.reconnectDelay = opts.reconnectDelay ?? 2 * this.timeout;
    this.retryMin = opts.retryMin ?? 500;
    this.retryMax = opts.retryMax ?? 30000;
    this.retry = opts.retry ?? true;
    this.dialLink = opts.dial ?? (async () => new TcpLink(await this.dialTcp()));
    this.firstFailure.promise.catch(() => {});
  }

  /** Address of the server in use now (or tried next). */
  get host(): string {
    return this.servers[this.current].host;
  }

  get port(): number {
    return this.servers[this.current].port;
  }

  /** Counts a failed attempt; after `failover` in a row, moves on to the next server. */
  private failedAttempt(): void {
    this.failedAttempts++;
    if (++this.failedHere < this.failover || this.servers.length < 2) return;
    const from = `${this.host}:${this.port}`;
    this.current = (this.current + 1) % this.servers.length;
    this.failedHere = 0;
    this.log.warn('moving to the next server', { from, to: `${this.host}:${this.port}`, failedAttempts: this.failover });
  }

  /** Times the link came up (the original's `connects`). */
  get connects(): number {
    return this.counters.connects;
  }

  /** Starts connecting (once) and resolves when the link is first up. */
  async connect(): Promise<void> {
    this.running ??= this.run();
    await Promise.race([this.ready(), this.firstFailure.promise]);
  }

  /**
   * Drops the current link as if WiFi had failed: the client reconnects after
   * `reconnectDelay`, and unacknowledged qos messages are sent again.
   */
  disconnect(reason = 'disconnected by the device'): void {
    this.dropLink(reason);
  }

  override close(): void {
    this.stop.abort();
    super.close();
  }

  protected describe(): string {
    return `client ${JSON.stringify(this.id)}`;
  }

  protected override onLinkLost(_reason: string, wasUp: boolean): void {
    this.linkGone?.resolve(wasUp);
  }

  private dialTcp(): Promise<net.Socket> {
    return new Promise((resolve, reject) => {
      const socket = this.tlsOpts
        ? tls.connect({ servername: net.isIP(this.host) ? undefined : this.host, ...this.tlsOpts, host: this.host, port: this.port })
        : net.connect({ host: this.host, port: this.port });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`connect timed out after ${this.timeout} ms`));
      }, this.timeout);
      socket.once(this.tlsOpts ? 'secureConnect' : 'connect', () => {
        clearTimeout(timer);
        socket.removeAllListeners('error');
        resolve(socket);
      });
      socket.once('error', (err: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        socket.destroy();
        reject(new Error(err.code ?? err.message));
      });
    });
  }

  private async run(): Promise<void> {
    const signal = this.stop.signal;
    let backoff = this.retryMin;
    while (!signal.aborted) {
      let link: Link;
      try {
        link = await this.dialLink();
      } catch (e) {
        const msg = (e as Error).message;
        this.log.warn('connect failed', { server: `${this.host}:${this.port}`, error: msg, retryIn: backoff });
        if (!this.retry && this.connects === 0) {
          this.firstFailure.reject(
            new Error(`cannot connect to ${this.host}:${this.port} (${msg}): is the server running? (retry: true keeps trying)`),
          );
          this.close();
          return;
        }
        this.failedAttempt();
        await sleep(backoff, signal);
        backoff = Math.min(backoff * 2, this.retryMax);
        continue;
      }
      if (signal.aborted) {
        link.close('client closed');
        return;
      }
      this.linkGone = deferred<boolean>();
      this.attachLink(link, undefined, false, 0);
      this.sendRaw(this.idLine + '\n');
      const wasUp = await this.linkGone.promise;
      this.linkGone = null;
      if (signal.aborted) return;
      if (wasUp) {
        backoff = this.retryMin;
        this.failedHere = 0;
        await sleep(this.reconnectDelay, signal);
      } else {
        this.failedAttempt();
        await sleep(backoff, signal);
        backoff = Math.min(backoff * 2, this.retryMax);
      }
    }
  }
}

/** `"host:port"`, `"host"` or `{ host, port }` as { host, port }. */
function parseServer(s: string | { host: string; port?: number }, defaultPort: number): { host: string; port: number } {
  if (typeof s === 'object' && s && typeof s.host === 'string' && s.host) {
    const port = s.port ?? defaultPort;
    if (Number.isInteger(port) && port > 0 && port < 65536) return { host: s.host, port };
  } else if (typeof s === 'string' && s) {
    const m = /^(\[[^\]]+\]|[^:]+)(?::(\d+))?$/.exec(s);
    if (m) {
      const port = m[2] ? Number(m[2]) : defaultPort;
      if (port > 0 && port < 65536) return { host: m[1].replace(/^\[|\]$/g, ''), port };
    }
  }
  throw new TetherError('ERR_BAD_CONFIG', `servers: ${JSON.stringify(s)} is not "host:port" or { "host": "…", "port": 8123 }`);
}

/** `id[##type[##{json}]]` with `"boot": boot` added to its metadata. */
export function withBootId(idLine: string, boot: string): string {
  const [id, type = '', json] = idLine.split('##');
  let meta: Record<string, unknown> = {};
  if (json !== undefined) {
    try {
      meta = JSON.parse(json) as Record<string, unknown>;
    } catch {
      throw new TetherError('ERR_BAD_CONFIG', `the metadata in client id ${JSON.stringify(idLine)} is not JSON: write it as id##type##{"key": "value"}`);
    }
  }
  return `${id}##${type}##${JSON.stringify({ ...meta, boot })}`;
}
