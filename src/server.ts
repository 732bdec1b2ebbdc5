/**
 * The registry of Connections and the policies for who may attach to them.
 * Transports hand it raw links; it reads the ID line and attaches the link to that
 * ID's Connection (creating it the first time).
 */
import { EventEmitter } from 'node:events';
import { isUtf8 } from 'node:buffer';
import type { AddressInfo } from 'node:net';
import { Connection, ConnectionOptions } from './connection';
import { checkInt, ENDPOINT_DEFAULTS } from './endpoint';
import { closedError, TetherError, waitAbortedError } from './errors';
import type { Link } from './link';
import { createLogger, Logger } from './log';
import { FileStore, StoreOptions } from './store';
import { TcpTransport } from './transports/tcp';
import { Notifier, preview } from './util';

export type DuplicateIdPolicy = 'ignore-new' | 'replace-old';

export interface ServerOptions extends ConnectionOptions {
  /** Address to listen on. Default `0.0.0.0` (devices reach it over WiFi). */
  host?: string;
  /** TCP port. Default 8123. 0 picks a free port (see `server.port`). */
  port?: number;
  /** ms a new socket has to send its complete ID line. Default: `timeout`. */
  idTimeout?: number;
  /** Longest ID line accepted, in bytes. Default 1024. */
  maxIdLength?: number;
  /** IDs the apps expect; `waitAll()` waits for these. Default none. */
  expected?: string[];
  /** If set, only these IDs may connect; others are closed and logged. Default: any ID (unknown ones are logged). */
  allow?: string[] | null;
  /** A newcomer presenting an ID whose link is still up: `ignore-new` closes the newcomer (the original's rule), `replace-old` drops the old link. Default `ignore-new`. */
  duplicateId?: DuplicateIdPolicy;
  /**
   * Keep accepted qos messages, message ids, duplicate rings and unread lines
   * on disk so a restarted server carries on where it stopped: a folder, or
   * StoreOptions. Default: off (everything lives in memory).
   */
  persist?: string | Omit<StoreOptions, 'logger'> | null;
}

export const SERVER_DEFAULTS = {
  host: '0.0.0.0',
  port: 8123,
  maxIdLength: 1024,
  duplicateId: 'ignore-new' as DuplicateIdPolicy,
} as const;

/** Why links were turned away before reaching a Connection. */
export interface HandshakeStats {
  accepted: number;
  idTimeout: number;
  idTooLong: number;
  badId: number;
  closedEarly: number;
  unknownId: number;
  duplicateId: number;
}

/** Splits `id##type##{json}` (self-declared type and metadata) from a plain ID. */
export function parseIdLine(line: string): { id: string; type?: string; meta?: Record<string, unknown> } | { error: string } {
  const at = line.indexOf('##');
  if (at < 0) return { id: line };
  const id = line.slice(0, at);
  const rest = line.slice(at + 2);
  const at2 = rest.indexOf('##');
  const type = at2 < 0 ? rest : rest.slice(0, at2);
  if (!id) return { error: 'empty client ID before "##"' };
  if (!type) return { error: 'empty type after "##"' };
  if (at2 < 0) return { id, type };
  let meta: unknown;
  try {
    meta = JSON.parse(rest.slice(at2 + 2));
  } catch (e) {
    return { error: `metadata is not valid JSON (${(e as Error).message})` };
  }
  if (!meta || typeof meta !== 'object' || Array.isArray(meta)) return { error: 'metadata must be a JSON object' };
  return { id, type, meta: meta as Record<string, unknown> };
}

export class Server extends EventEmitter {
  readonly log: Logger;
  readonly handshakes: HandshakeStats = {
    accepted: 0,
    idTimeout: 0,
    idTooLong: 0,
    badId: 0,
    closedEarly: 0,
    unknownId: 0,
    duplicateId: 0,
  };
  private readonly conns = new Map<string, Connection>();
  private readonly arrived = new Notifier();
  /** Links still sending their ID line, with what aborts each handshake. */
  private readonly handshaking = new Map<Link, () => void>();
  private readonly connOpts: ConnectionOptions;
  private readonly idTimeout: number;
  private readonly maxIdLength: number;
  private readonly allow: Set<string> | null;
  private readonly expected: string[];
  private readonly duplicateId: DuplicateIdPolicy;
  private tcp: TcpTransport | null = null;
  private closed = false;
  /** The journals, when persistence is on. */
  readonly store: FileStore | null;

  /** Creates a server and starts listening on TCP. */
  static async listen(opts: ServerOptions = {}): Promise<Server> {
    const server = new Server(opts);
    await server.listenTcp(opts.host ?? SERVER_DEFAULTS.host, opts.port ?? SERVER_DEFAULTS.port);
    return server;
  }

  /** A server with no transport yet: call `listenTcp()` or hand links to `accept()`. */
  constructor(readonly opts: ServerOptions = {}) {
    super();
    this.log = opts.logger ?? createLogger();
    this.connOpts = { ...opts, logger: this.log };
    this.idTimeout = checkInt('idTimeout', opts.idTimeout ?? opts.timeout ?? ENDPOINT_DEFAULTS.timeout, 1);
    this.maxIdLength = checkInt('maxIdLength', opts.maxIdLength ?? SERVER_DEFAULTS.maxIdLength, 1);
    this.allow = opts.allow ? new Set(opts.allow) : null;
    this.expected = opts.expected ?? [];
    this.duplicateId = opts.duplicateId ?? SERVER_DEFAULTS.duplicateId;
    const persist = typeof opts.persist === 'string' ? { dir: opts.persist } : opts.persist;
    this.store = persist ? new FileStore({ ...persist, logger: this.log }) : null;
    if (this.duplicateId !== 'ignore-new' && this.duplicateId !== 'replace-old') {
      throw new TetherError('ERR_BAD_CONFIG', `duplicateId must be "ignore-new" or "replace-old", got ${JSON.stringify(this.duplicateId)}`);
    }
  }

  async listenTcp(host: string, port: number): Promise<AddressInfo> {
    if (this.tcp) throw new Error('this server already listens on TCP');
    this.tcp = new TcpTransport((link) => this.accept(link), { host, port, logger: this.log });
    const addr = await this.tcp.listen();
    this.log.info('listening', { host: addr.address, port: addr.port });
    return addr;
  }

  /** The TCP port listened on (useful with port 0). */
  get port(): number {
    return this.tcp?.address()?.port ?? 0;
  }

  /** Links that have not yet sent their ID line. */
  get pendingHandshakes(): number {
    return this.handshaking.size;
  }

  /** The Connection for `id`, if that client has ever connected. */
  get(id: string): Connection | undefined {
    return this.conns.get(id);
  }

  /** Every Connection so far. */
  connections(): Connection[] {
    return [...this.conns.values()];
  }

  /** The Connection for `id`, waiting until that client first connects. */
  async clientConn(id: string, signal?: AbortSignal): Promise<Connection> {
    for (;;) {
      const c = this.conns.get(id);
      if (c) return c;
      if (this.closed) throw closedError('the server');
      await this.arrived.wait(signal, waitAbortedError(`clientConn(${JSON.stringify(id)})`));
    }
  }

  /** Waits until every one of `ids` (default: `expected`) has connected once. */
  waitAll(ids: string[] = this.expected, signal?: AbortSignal): Promise<Connection[]> {
    return Promise.all(ids.map((id) => this.clientConn(id, signal)));
  }

  /**
   * Takes a new link from a transport: reads its ID line within `idTimeout`, applies
   * the allow-list and duplicate-ID policies, and attaches it to that ID's Connection.
   */
  accept(link: Link): void {
    if (this.closed) {
      link.close('server closed');
      return;
    }
    const chunks: Buffer[] = [];
    let size = 0;
    const finish = () => {
      clearTimeout(timer);
      this.handshaking.delete(link);
      link.setHandlers(null);
    };
    const reject = (why: keyof HandshakeStats, msg: string, fields: Record<string, unknown> = {}) => {
      finish();
      this.handshakes[why]++;
      link.close(msg);
      this.log.warn(msg, { remote: link.remote, ...fields });
    };
    const timer = setTimeout(
      () =>
        reject('idTimeout', 'no ID line in time: socket closed', {
          idTimeout: this.idTimeout,
          received: size,
          hint: 'the device must send its client ID and "\\n" first',
        }),
      this.idTimeout,
    );
    this.handshaking.set(link, () => {
      finish();
      link.close('server closed');
    });
    link.setHandlers({
      data: (chunk) => {
        const nl = chunk.indexOf(0x0a);
        if (nl === -1) {
          size += chunk.length;
          if (size > this.maxIdLength) {
            reject('idTooLong', 'ID line too long: socket closed', { maxIdLength: this.maxIdLength, received: size });
          } else {
            chunks.push(chunk);
          }
          return;
        }
        size += nl;
        if (size > this.maxIdLength) {
          reject('idTooLong', 'ID line too long: socket closed', { maxIdLength: this.maxIdLength, received: size });
          return;
        }
        chunks.push(chunk.subarray(0, nl));
        const idBuf = Buffer.concat(chunks);
        const rest = chunk.subarray(nl + 1);
        if (idBuf.length === 0 || !isUtf8(idBuf)) {
          reject('badId', 'bad ID line (empty or not UTF-8): socket closed', { id: preview(idBuf) });
          return;
        }
        finish();
        this.attach(idBuf.toString('utf8'), link, rest);
      },
      close: (reason) => {
        finish();
        this.handshakes.closedEarly++;
        this.log.debug('link closed before its ID line', { remote: link.remote, reason });
      },
      drain: () => {},
    });
  }

  /**
   * Attaches a link whose ID line is known (transports with their own handshake
   * may call this). An ID line `id##type##{json}` declares the device's type and
   * metadata; the client ID is then the part before the first `##`.
   */
  attach(idLine: string, link: Link, rest?: Buffer): void {
    const declared = parseIdLine(idLine);
    if ('error' in declared) {
      this.handshakes.badId++;
      link.close('bad ID line');
      this.log.warn('bad ID line: socket closed', { remote: link.remote, error: declared.error, hint: 'use id##type##{"json": "metadata"} or a plain ID' });
      return;
    }
    const id = declared.id;
    if (this.allow && !this.allow.has(id)) {
      this.handshakes.unknownId++;
      link.close('unknown client ID');
      this.log.warn('unknown client ID rejected', { id, remote: link.remote, hint: 'add it to "allow" in the config' });
      return;
    }
    let conn = this.conns.get(id);
    if (conn?.hasLink) {
      this.handshakes.duplicateId++;
      if (this.duplicateId === 'ignore-new') {
        link.close('duplicate client ID');
        this.log.warn('duplicate client ID: newcomer closed, the connected link stays', {
          id,
          remote: link.remote,
          connected: conn.remote,
          hint: 'two devices may share this ID; or the old link is half-open and will time out',
        });
        return;
      }
      this.log.warn('duplicate client ID: old link replaced by the newcomer', { id, remote: link.remote, replaced: conn.remote });
      conn.disconnect('replaced by a newer link with the same ID');
    }
    this.handshakes.accepted++;
    if (!conn) {
      if (!this.allow && this.expected.length > 0 && !this.expected.includes(id)) {
        this.log.info('client ID not in the expected list: accepted', { id, remote: link.remote });
      }
      const durable = this.store?.attach(id);
      conn = new Connection(id, (other) => this.conns.get(other), this.connOpts, durable);
      this.conns.set(id, conn);
      const created = conn;
      // An app that closes a Connection retires it: the ID's next link starts a fresh one.
      created.once('close', () => {
        if (this.closed || this.conns.get(id) !== created) return;
        this.conns.delete(id);
        if (durable) {
          durable.journal.close();
          this.store!.forget(id);
        }
        this.log.info('connection closed by the app: its next link starts a fresh Connection', { id });
      });
      conn.declare(declared.type, declared.meta);
      this.emit('connection', conn);
      this.arrived.notify();
    }
    conn.declare(declared.type, declared.meta); // a device may declare new metadata on every connect
    conn.attach(link, rest);
    this.emit('attach', conn, link);
  }

  /** Closes every Connection (they reject pending writes and readers) and stops listening. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const abort of [...this.handshaking.values()]) abort();
    for (const c of this.conns.values()) c.close();
    this.store?.closeAll();
    this.arrived.notify();
    await this.tcp?.close();
    this.log.info('server closed');
  }

  /** Same as close(), the original's name. */
  closeAll(): Promise<void> {
    return this.close();
  }
}
