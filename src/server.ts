/**
 * The registry of Connections and the policies for who may attach to them.
 * Transports hand it raw links; it reads the ID line and attaches the link to that
 * ID's Connection (creating it the first time).
 */
import { EventEmitter } from 'node:events';
import { isUtf8 } from 'node:buffer';
import type { AddressInfo } from 'node:net';
import { AUTH_DEFAULTS, AuthOptions, FailureTracker, hashProblem, splitSecret, verifySecret } from './auth';
import { Connection, ConnectionOptions, Durable } from './connection';
import { checkInt, ENDPOINT_DEFAULTS, RxBudget } from './endpoint';
import { closedError, TetherError, waitAbortedError } from './errors';
import type { Link } from './link';
import { createLogger, Logger } from './log';
import { FileStore, StoreOptions } from './store';
import { LimitHits, LimitName, throttledInfo, throttledWarn, zeroHits } from './limits';
import { TcpTransport, TlsOptions, TLS_CLIENT_CERTS } from './transports/tcp';
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
  /** Open device sockets (TCP and TLS together, handshaking or attached) before new ones are refused. Default 10000. */
  maxConnections?: number;
  /** Open device sockets from one IP address before its new ones are refused. Default 256. */
  maxConnectionsPerAddress?: number;
  /** Bytes queued toward a device that does not read before its link is dropped. Default 1 MiB. */
  maxSendBuffer?: number;
  /** Client IDs (Connections) the server keeps at most; links with a new ID beyond this are refused. Default 100000. */
  maxDevices?: number;
  /**
   * Characters of received lines waiting for apps, over all Connections
   * together; beyond it new messages wait un-ACKed until apps read (each
   * Connection is bounded by rxBufferBytes as well). Default 67108864 (64 MiB).
   */
  maxBufferedBytes?: number;
  /**
   * Protocol violations from one source address within `strikeWindow` that get it
   * blocked for `blockFor`: no ID line in time, an over-long or bad ID line,
   * closing before the ID line, an over-long line, a link sending bad lines.
   * 0 turns blocking off. Default 10.
   */
  maxStrikes?: number;
  /** ms over which strikes are counted. Default 60000. */
  strikeWindow?: number;
  /** ms an address blocked for strikes is refused. Default 60000. */
  blockFor?: number;
  /** TLS for device links (see TlsOptions). Default: off (plain TCP, as the original). */
  tls?: TlsOptions | null;
  /** Device authentication by a secret in the ID line or a TLS client certificate. Default: off (any ID may connect, as the original). */
  auth?: AuthOptions | null;
  /**
   * ID lines may declare the device's type and metadata, `id##type##{json}`
   * (and tether's clients their boot id, `{"boot": "…"}`). Off: `##` is part of
   * the client ID, as with the original server. Default false.
   */
  idLineTypes?: boolean;
}

export const SERVER_DEFAULTS = {
  host: '0.0.0.0',
  port: 8123,
  maxIdLength: 1024,
  duplicateId: 'ignore-new' as DuplicateIdPolicy,
  maxConnections: 10_000,
  maxConnectionsPerAddress: 256,
  maxSendBuffer: 1024 * 1024,
  maxDevices: 100_000,
  maxBufferedBytes: 64 * 1024 * 1024,
  maxStrikes: 10,
  strikeWindow: 60_000,
  blockFor: 60_000,
  idLineTypes: false,
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
  /** Refused: bad or missing secret, or a certificate for another ID. */
  authFailed: number;
}

export interface IdLine {
  id: string;
  /** The secret after `@`, or null for a plain ID. */
  secret: string | null;
  type?: string;
  meta?: Record<string, unknown>;
}

/**
 * Why `id` cannot be a client ID, or null. tether takes any ID the original
 * server takes except those no operator could tell apart or address: empty or
 * white space only, or holding control characters (a trailing `\r` or `\0`,
 * terminal escapes) or invisible text-direction marks (right-to-left tricks).
 */
export function idProblem(id: string): string | null {
  if (id.trim() === '') return 'the client ID is empty or only white space';
  // eslint-disable-next-line no-control-regex -- control characters are exactly what this refuses
  const bad = /[\u0000-\u001f\u007f-\u009f\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]/.exec(id);
  if (bad) {
    const code = bad[0].charCodeAt(0).toString(16).toUpperCase().padStart(4, '0');
    return `the client ID contains U+${code}, a control or invisible character: set a plain ID on the board`;
  }
  return null;
}

/** The one form of a client ID tether uses: Unicode NFC, so two encodings of "café" are one device. */
export function normalizeId(id: string): string {
  return id.normalize('NFC');
}

/** Which parts of tether's ID-line grammar are in use (each off: those characters belong to the ID, as with the original server). */
export interface IdLineGrammar {
  /** `id@secret`: on when device authentication is configured. */
  secrets: boolean;
  /** `id##type##{json}` (type may be empty when metadata follows): on with the idLineTypes option. */
  types: boolean;
}

/**
 * Splits an ID line `id[@secret][##type[##{json}]]`: the client ID, the device's
 * secret (see auth.ts), its self-declared type and metadata. Each part of the
 * grammar applies only when its feature is in use (`grammar`); otherwise `@` and
 * `##` are ordinary characters of the client ID, exactly as the original server
 * reads them, so a board whose ID contains them keeps working.
 */
export function parseIdLine(line: string, grammar: IdLineGrammar = { secrets: true, types: true }): IdLine | { error: string } {
  const at = grammar.types ? line.indexOf('##') : -1;
  const head = at < 0 ? line : line.slice(0, at);
  const split = grammar.secrets ? splitSecret(head) : { id: head, secret: null };
  const id = normalizeId(split.id);
  const secret = split.secret;
  const problem = id ? idProblem(id) : null;
  if (problem) return { error: problem };
  if (!id) return { error: at < 0 ? 'empty client ID before "@"' : 'empty client ID before "##"' };
  if (secret === '') return { error: 'empty secret after "@"' };
  if (at < 0) return { id, secret };
  const rest = line.slice(at + 2);
  const at2 = rest.indexOf('##');
  const type = at2 < 0 ? rest : rest.slice(0, at2);
  if (!type && at2 < 0) return { error: 'empty type after "##"' };
  if (at2 < 0) return { id, secret, type };
  let meta: unknown;
  try {
    meta = JSON.parse(rest.slice(at2 + 2));
  } catch (e) {
    return { error: `metadata is not valid JSON (${(e as Error).message})` };
  }
  if (!meta || typeof meta !== 'object' || Array.isArray(meta)) return { error: 'metadata must be a JSON object' };
  return { id, secret, type: type || undefined, meta: meta as Record<string, unknown> };
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
    authFailed: 0,
  };
  /** Times each limit turned something away (exported as tether_limit_hits_total). */
  readonly limits: LimitHits = zeroHits();
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
  private tlsTcp: TcpTransport | null = null;
  private readonly maxConnections: number;
  private readonly maxPerAddress: number;
  private readonly maxSendBuffer: number;
  private openSockets = 0;
  private readonly perAddress = new Map<string, number>();
  private readonly auth: (Required<Omit<AuthOptions, 'devices'>> & { devices: Map<string, string> }) | null;
  private readonly failures: FailureTracker | null;
  private readonly strikes: FailureTracker | null;
  /** Newcomers presenting an ID that is already connected, per address: a flood of them blocks it too. */
  private readonly dupes: FailureTracker | null;
  private readonly maxStrikes: number;
  private readonly maxDevices: number;
  private readonly grammar: IdLineGrammar;
  private closed = false;
  /** The journals, when persistence is on. */
  readonly store: FileStore | null;

  /** Creates a server and starts listening on TCP. */
  static async listen(opts: ServerOptions = {}): Promise<Server> {
    const server = new Server(opts);
    const host = opts.host ?? SERVER_DEFAULTS.host;
    const port = opts.port ?? SERVER_DEFAULTS.port;
    try {
      if (opts.tls) {
        const separate = opts.tls.port !== undefined;
        await server.listenTcp(host, separate ? opts.tls.port! : port, opts.tls);
        if (separate) await server.listenTcp(host, port);
      } else {
        await server.listenTcp(host, port);
      }
    } catch (e) {
      await server.close();
      throw e;
    }
    return server;
  }

  /** A server with no transport yet: call `listenTcp()` or hand links to `accept()`. */
  constructor(readonly opts: ServerOptions = {}) {
    super();
    this.log = opts.logger ?? createLogger();
    const budget = new RxBudget(checkInt('maxBufferedBytes', opts.maxBufferedBytes ?? SERVER_DEFAULTS.maxBufferedBytes, 1));
    this.connOpts = { ...opts, logger: this.log, budget };
    this.idTimeout = checkInt('idTimeout', opts.idTimeout ?? opts.timeout ?? ENDPOINT_DEFAULTS.timeout, 1);
    this.maxIdLength = checkInt('maxIdLength', opts.maxIdLength ?? SERVER_DEFAULTS.maxIdLength, 1);
    this.allow = opts.allow ? new Set(opts.allow.map(normalizeId)) : null;
    this.expected = opts.expected ?? [];
    this.duplicateId = opts.duplicateId ?? SERVER_DEFAULTS.duplicateId;
    const persist = typeof opts.persist === 'string' ? { dir: opts.persist } : opts.persist;
    this.store = persist ? new FileStore({ ...persist, logger: this.log }) : null;
    if (this.duplicateId !== 'ignore-new' && this.duplicateId !== 'replace-old') {
      throw new TetherError('ERR_BAD_CONFIG', `duplicateId must be "ignore-new" or "replace-old", got ${JSON.stringify(this.duplicateId)}`);
    }
    this.maxConnections = checkInt('maxConnections', opts.maxConnections ?? SERVER_DEFAULTS.maxConnections, 1);
    this.maxPerAddress = checkInt('maxConnectionsPerAddress', opts.maxConnectionsPerAddress ?? SERVER_DEFAULTS.maxConnectionsPerAddress, 1);
    this.maxSendBuffer = checkInt('maxSendBuffer', opts.maxSendBuffer ?? SERVER_DEFAULTS.maxSendBuffer, 1024);
    this.maxDevices = checkInt('maxDevices', opts.maxDevices ?? SERVER_DEFAULTS.maxDevices, 1);
    this.maxStrikes = checkInt('maxStrikes', opts.maxStrikes ?? SERVER_DEFAULTS.maxStrikes, 0);
    this.strikes =
      this.maxStrikes > 0
        ? new FailureTracker(
            this.maxStrikes,
            checkInt('strikeWindow', opts.strikeWindow ?? SERVER_DEFAULTS.strikeWindow, 1),
            checkInt('blockFor', opts.blockFor ?? SERVER_DEFAULTS.blockFor, 0),
          )
        : null;
    // A board retrying while its old link times out, or two boards sharing an ID, present a
    // duplicate every few seconds; only a flood far beyond that blocks the address.
    this.dupes = this.strikes ? new FailureTracker(this.maxStrikes * 10, opts.strikeWindow ?? SERVER_DEFAULTS.strikeWindow, opts.blockFor ?? SERVER_DEFAULTS.blockFor) : null;
    if (opts.tls && !TLS_CLIENT_CERTS.includes(opts.tls.clientCerts ?? 'off')) {
      throw new TetherError('ERR_BAD_CONFIG', `tls.clientCerts must be one of ${TLS_CLIENT_CERTS.join(', ')}, got ${JSON.stringify(opts.tls.clientCerts)}`);
    }
    this.grammar = { secrets: !!opts.auth, types: opts.idLineTypes ?? SERVER_DEFAULTS.idLineTypes };
    if (opts.auth) {
      const a = opts.auth;
      const devices = new Map(Object.entries(a.devices ?? {}).map(([id, h]) => [normalizeId(id), h] as const));
      for (const [id, stored] of devices) {
        if (hashProblem(stored)) throw new TetherError('ERR_BAD_CONFIG', `auth.devices[${JSON.stringify(id)}] must be ${hashProblem(stored)}`);
      }
      this.auth = {
        devices,
        required: a.required ?? AUTH_DEFAULTS.required,
        maxFailures: checkInt('auth.maxFailures', a.maxFailures ?? AUTH_DEFAULTS.maxFailures, 1),
        failureWindow: checkInt('auth.failureWindow', a.failureWindow ?? AUTH_DEFAULTS.failureWindow, 1),
        blockFor: checkInt('auth.blockFor', a.blockFor ?? AUTH_DEFAULTS.blockFor, 0),
      };
      this.failures = new FailureTracker(this.auth.maxFailures, this.auth.failureWindow, this.auth.blockFor);
    } else {
      this.auth = null;
      this.failures = null;
    }
    // With persistence, every device with a journal is there from the start (its unread lines readable, its queue sending).
    if (this.store) {
      const allowed = (id: string) => !this.allow || this.allow.has(id);
      for (const r of this.store.restoreAll(allowed, this.maxDevices)) this.create(r.id, r);
    }
  }

  /** Counts a limit hit and logs it (throttled: a flood of junk must not flood the log). */
  hitLimit(name: LimitName, msg: string, fields: Record<string, unknown> = {}): void {
    this.limits[name]++;
    throttledWarn(this.log, msg, { limit: name, ...fields });
  }

  /** Records a protocol violation from `address`; enough of them block it (maxStrikes). */
  private strike(address: string, why: string): void {
    if (!this.strikes?.fail(address)) return;
    this.hitLimit('strikes', 'address blocked after repeated protocol violations', {
      address,
      maxStrikes: this.maxStrikes,
      last: why,
      hint: 'its new connections are refused until the block lifts (blockFor); if it is a real device, fix what it sends (see the warnings before this one)',
    });
  }

  /** Decides whether a new socket from `address` may stay open (the connection limits and address blocks). */
  private admit(address: string): LimitName | null {
    const authBlock = this.failures?.blockedFor(address) ?? 0;
    const blocked = Math.max(authBlock, this.strikes?.blockedFor(address) ?? 0, this.dupes?.blockedFor(address) ?? 0);
    if (blocked > 0) {
      this.hitLimit('addressBlocked', 'connection refused: address blocked', {
        address,
        retryInMs: blocked,
        why: authBlock > 0 ? 'failed authentication' : 'protocol violations',
        hint: 'the block lifts by itself (auth.blockFor / blockFor); fix the device or its secret meanwhile',
      });
      return 'addressBlocked';
    }
    if (this.openSockets >= this.maxConnections) {
      this.hitLimit('maxConnections', 'connection refused: maxConnections reached', { address, maxConnections: this.maxConnections, hint: 'raise maxConnections, or run more gateways' });
      return 'maxConnections';
    }
    const mine = this.perAddress.get(address) ?? 0;
    if (mine >= this.maxPerAddress) {
      this.hitLimit('maxConnectionsPerAddress', 'connection refused: too many connections from one address', {
        address,
        maxConnectionsPerAddress: this.maxPerAddress,
        hint: 'raise maxConnectionsPerAddress if many devices share this address (NAT)',
      });
      return 'maxConnectionsPerAddress';
    }
    this.openSockets++;
    this.perAddress.set(address, mine + 1);
    return null;
  }

  private release(address: string): void {
    this.openSockets--;
    const left = (this.perAddress.get(address) ?? 1) - 1;
    if (left > 0) this.perAddress.set(address, left);
    else this.perAddress.delete(address);
  }

  /** Device sockets open right now (TCP and TLS), as the connection limits count them. */
  get openConnections(): number {
    return this.openSockets;
  }

  /** Source addresses blocked right now after failed authentication. */
  get blockedAddresses(): number {
    return (this.failures?.blockedCount ?? 0) + (this.strikes?.blockedCount ?? 0) + (this.dupes?.blockedCount ?? 0);
  }

  /** Starts listening for device links on TCP, or TLS with `tls` (once each). */
  async listenTcp(host: string, port: number, tls?: TlsOptions): Promise<AddressInfo> {
    if (tls ? this.tlsTcp : this.tcp) throw new Error(`this server already listens on ${tls ? 'TLS' : 'TCP'}`);
    const transport = new TcpTransport((link) => this.accept(link), {
      host,
      port,
      tls,
      logger: this.log,
      handshakeTimeout: this.idTimeout,
      maxSendBuffer: this.maxSendBuffer,
      admit: (address) => this.admit(address),
      release: (address) => this.release(address),
      onLimit: (name, fields) =>
        this.hitLimit(name, name === 'tlsHandshake' ? 'TLS handshake failed: socket closed' : 'device not reading: link dropped', fields),
    });
    if (tls) this.tlsTcp = transport;
    else this.tcp = transport;
    const addr = await transport.listen();
    this.log.info('listening', { host: addr.address, port: addr.port, tls: !!tls, clientCerts: tls ? (tls.clientCerts ?? 'off') : undefined });
    return addr;
  }

  /** The plain TCP port listened on (useful with port 0); with TLS on the main port, that port. */
  get port(): number {
    return (this.tcp ?? this.tlsTcp)?.address()?.port ?? 0;
  }

  /** The TLS port, or 0 without TLS. */
  get tlsPort(): number {
    return this.tlsTcp?.address()?.port ?? 0;
  }

  /** Links that have not yet sent their ID line. */
  get pendingHandshakes(): number {
    return this.handshaking.size;
  }

  /** The Connection for `id`, if that client has ever connected. */
  get(id: string): Connection | undefined {
    return this.conns.get(id) ?? this.conns.get(normalizeId(id));
  }

  /** Every Connection so far. */
  connections(): Connection[] {
    return [...this.conns.values()];
  }

  /** The Connection for `id`, waiting until that client first connects. */
  async clientConn(id: string, signal?: AbortSignal): Promise<Connection> {
    id = normalizeId(id);
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
    const reject = (why: 'idTimeout' | 'idTooLong' | 'badId', msg: string, fields: Record<string, unknown> = {}) => {
      finish();
      this.handshakes[why]++;
      link.close(msg);
      if (why === 'badId') throttledWarn(this.log, msg, { remote: link.remote, ...fields });
      else this.hitLimit(why === 'idTimeout' ? 'idTimeout' : 'maxIdLength', msg, { remote: link.remote, ...fields });
      // A socket that said nothing at all (a port monitor, a board whose WiFi dropped) is no violation.
      if (size > 0) this.strike(link.address ?? link.remote, why);
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
        this.log.debug('link closed before its ID line', { remote: link.remote, reason, received: size });
        // A bare connect and close is how health checks and port monitors probe: never a strike.
        if (size > 0) this.strike(link.address ?? link.remote, 'closedEarly');
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
    const declared = parseIdLine(idLine, this.grammar);
    if ('error' in declared) {
      this.handshakes.badId++;
      link.close('bad ID line');
      throttledWarn(this.log, 'bad ID line: socket closed', { remote: link.remote, error: declared.error, hint: 'send a plain ID, or id@secret##type##{"json": "metadata"}' });
      this.strike(link.address ?? link.remote, 'badId');
      return;
    }
    if (!this.auth) {
      this.bind(declared, link, rest);
      return;
    }
    // Hold the link (and anything it sends) while the secret is checked off the event loop.
    const held: Buffer[] = rest && rest.length > 0 ? [rest] : [];
    let gone = false;
    const abort = () => {
      gone = true;
      link.close('server closed');
    };
    this.handshaking.set(link, abort);
    link.pause();
    link.setHandlers({
      data: (chunk) => held.push(chunk),
      close: () => {
        gone = true;
        this.handshakes.closedEarly++;
      },
      drain: () => {},
    });
    this.authenticate(declared, link).then(
      (why) => {
        this.handshaking.delete(link);
        if (gone || this.closed) return;
        link.setHandlers(null);
        if (why) {
          this.authFailed(declared.id, link, why);
          return;
        }
        link.resume();
        this.bind(declared, link, held.length > 0 ? Buffer.concat(held) : undefined);
      },
      (err) => {
        this.handshaking.delete(link);
        link.close('authentication error');
        this.log.error('authentication check failed', { id: declared.id, remote: link.remote, err });
      },
    );
  }

  /** Why `d` may not use its ID on `link`, or null if it may. */
  private async authenticate(d: IdLine, link: Link): Promise<string | null> {
    const auth = this.auth!;
    if (link.certId) return link.certId === d.id ? null : `its TLS certificate is for ${JSON.stringify(link.certId)}`;
    const stored = auth.devices.get(d.id);
    if (stored === undefined) return auth.required ? 'no secret is configured for this ID (auth.devices)' : null;
    if (d.secret === null) return 'no secret in the ID line (send id@secret)';
    return (await verifySecret(d.secret, stored)) ? null : 'wrong secret';
  }

  private authFailed(id: string, link: Link, why: string): void {
    this.handshakes.authFailed++;
    link.close('authentication failed');
    const address = link.address ?? link.remote;
    this.hitLimit('authFailed', 'authentication failed: socket closed', {
      id,
      remote: link.remote,
      why,
      hint: 'configure the device with id@secret as its client ID (tether secret <id> makes one), or a TLS client certificate for its ID',
    });
    if (this.failures!.fail(address)) {
      this.log.warn('address blocked after repeated authentication failures', {
        address,
        failures: this.auth!.maxFailures,
        blockForMs: this.auth!.blockFor,
        hint: 'its connections are refused until the block lifts; fix the secret on the device',
      });
    }
  }

  /** Attaches an admitted (and, with auth, authenticated) link to its ID's Connection. */
  private bind(declared: IdLine, link: Link, rest?: Buffer): void {
    const id = declared.id;
    if (this.allow && !this.allow.has(id)) {
      this.handshakes.unknownId++;
      link.close('unknown client ID');
      throttledWarn(this.log, 'unknown client ID rejected', { id, remote: link.remote, hint: 'add it to "allow" in the config' });
      return;
    }
    let conn = this.conns.get(id);
    if (!conn && this.conns.size >= this.maxDevices) {
      link.close('too many devices');
      this.hitLimit('maxDevices', 'new client ID refused: maxDevices reached', {
        id,
        remote: link.remote,
        maxDevices: this.maxDevices,
        hint: 'raise maxDevices, turn on auth so only known devices get a Connection, or run more gateways',
      });
      return;
    }
    if (conn?.hasLink && conn.readingPaused) {
      // We stopped reading the old link, so its silence proves nothing: a board that comes back
      // is taken at its word (its old link is likely dead), whatever duplicateId says.
      this.log.info('a device reconnected while its old link was paused (nobody reading): the old link is replaced', { id, remote: link.remote, replaced: conn.remote });
      conn.disconnect('replaced: the device reconnected while reading was paused');
    }
    if (conn?.hasLink) {
      this.handshakes.duplicateId++;
      const address = link.address ?? link.remote;
      if (this.dupes?.fail(address)) {
        this.hitLimit('strikes', 'address blocked: it keeps presenting client IDs that are already connected', {
          address,
          id,
          per: this.maxStrikes * 10,
          hint: 'a real board retries every few seconds at most; if this is one, give each board its own ID',
        });
      }
      if (this.duplicateId === 'ignore-new') {
        link.close('duplicate client ID');
        throttledWarn(this.log, 'duplicate client ID: newcomer closed, the connected link stays', {
          id,
          remote: link.remote,
          connected: conn.remote,
          hint: 'two devices may share this ID; or the old link is half-open and will time out',
        });
        return;
      }
      throttledWarn(this.log, 'duplicate client ID: old link replaced by the newcomer', { id, remote: link.remote, replaced: conn.remote });
      conn.disconnect('replaced by a newer link with the same ID');
    }
    this.handshakes.accepted++;
    if (!conn) {
      if (!this.allow && this.expected.length > 0 && !this.expected.includes(id)) {
        throttledInfo(this.log, 'client ID not in the expected list: accepted', { id, remote: link.remote });
      }
      let durable: Durable | undefined;
      try {
        durable = this.store?.attach(id);
      } catch (e) {
        // The store handles its own I/O faults; whatever else goes wrong there must not take the server down either.
        this.log.error('journal could not be attached: this device runs without persistence', { id, error: (e as Error)?.stack ?? String(e) });
      }
      conn = this.create(id, durable, declared);
    }
    conn.declare(declared.type, declared.meta); // a device may declare new metadata on every connect
    const boot = typeof declared.meta?.boot === 'string' && declared.meta.boot.length > 0 ? declared.meta.boot : undefined;
    this.store?.linked(id, conn.declaredType, conn.meta, boot);
    conn.attach(link, rest, boot);
    this.emit('attach', conn, link);
  }

  /** Registers the Connection of a new ID (a device's first link, or a journal restored at start). */
  private create(id: string, durable: Durable | undefined, declared?: IdLine): Connection {
    const conn = new Connection(id, (other) => this.conns.get(other), this.connOpts, durable);
    this.conns.set(id, conn);
    conn.on('violation', (kind: string, l: Link | null) => this.strike(l?.address ?? l?.remote ?? `id:${id}`, kind));
    // An app that closes a Connection retires it: the ID's next link starts a fresh one.
    conn.once('close', () => {
      if (this.closed || this.conns.get(id) !== conn) return;
      this.conns.delete(id);
      if (durable) {
        durable.journal.close();
        this.store!.forget(id);
      }
      this.log.info('connection closed by the app: its next link starts a fresh Connection', { id });
    });
    if (declared) conn.declare(declared.type, declared.meta);
    else if (durable?.restored) conn.declare(durable.restored.type, durable.restored.meta);
    this.emit('connection', conn);
    this.arrived.notify();
    return conn;
  }

  /**
   * Stops accepting device links (the first step of a shutdown): new sockets are
   * refused by the OS, links already up carry on until close().
   */
  stopAccepting(): void {
    this.tcp?.stopListening();
    this.tlsTcp?.stopListening();
  }

  /** Closes every Connection (they reject pending writes and readers) and stops listening. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const abort of [...this.handshaking.values()]) abort();
    for (const c of this.conns.values()) c.close();
    this.store?.closeAll();
    this.arrived.notify();
    await Promise.all([this.tcp?.close(), this.tlsTcp?.close()]);
    this.log.info('server closed');
  }

  /** Same as close(), the original's name. */
  closeAll(): Promise<void> {
    return this.close();
  }
}
