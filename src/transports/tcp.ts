/**
 * TCP and TLS: sockets in, links out. Nothing here knows what an ACK or an ID
 * line is. The transport applies the connection limits (total and per source
 * address) before a socket becomes a link, and each link caps what it buffers
 * for a peer that does not read.
 */
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as tls from 'node:tls';
import type { AddressInfo } from 'node:net';
import { TetherError } from '../errors';
import type { LimitName } from '../limits';
import type { Link, LinkHandlers } from '../link';
import type { Logger } from '../log';

export interface TcpLinkOptions {
  /** Bytes queued toward a peer that does not read before the link is dropped. Default: no cap. */
  maxSendBuffer?: number;
  /** Told when the send buffer cap drops the link. */
  onLimit?: (name: LimitName, fields: Record<string, unknown>) => void;
  /** The client ID the peer's verified TLS certificate grants, if any. */
  certId?: string | null;
}

/** One TCP (or TLS) socket as a link. */
export class TcpLink implements Link {
  readonly remote: string;
  /** The peer's IP address (what per-address limits count). */
  readonly address: string;
  /** The client ID proven by the peer's TLS client certificate, or null. */
  readonly certId: string | null;
  private h: LinkHandlers | null = null;
  private closed = false;
  /** Lines written during this turn of the event loop, sent together by one socket write. */
  private out = '';
  private flushing: NodeJS.Immediate | null = null;
  /** write() said "full": a drain is owed to the owner once the bytes are on their way. */
  private full = false;
  private readonly maxSendBuffer: number;

  constructor(
    readonly socket: net.Socket,
    private readonly opts: TcpLinkOptions = {},
  ) {
    const scheme = socket instanceof tls.TLSSocket ? 'tls' : 'tcp';
    this.address = socket.remoteAddress ?? 'unknown';
    this.remote = `${scheme}:${socket.remoteAddress}:${socket.remotePort}`;
    this.certId = opts.certId ?? null;
    this.maxSendBuffer = opts.maxSendBuffer ?? Infinity;
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => this.h?.data(chunk));
    socket.on('drain', () => {
      this.full = false;
      this.h?.drain();
    });
    socket.on('error', (err: NodeJS.ErrnoException) => this.ended(`socket error: ${err.code ?? err.message}`));
    socket.on('end', () => this.ended('peer closed the socket'));
    socket.on('close', () => this.ended('socket closed'));
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /**
   * Queues `data` for this turn's socket write. False once what waits here plus
   * what the socket holds reaches its high-water mark: the owner then holds
   * further writes until `drain`. Counting the bytes not yet handed to the
   * socket matters: a writer that never yields (a loop of non-qos writes, each
   * resolved at once) would otherwise pile them up without bound, since the
   * flush only runs when the event loop turns.
   */
  write(data: string): boolean {
    if (this.closed) return true;
    this.out += data;
    this.flushing ??= setImmediate(this.flush);
    if (this.socket.writableNeedDrain || this.out.length + this.socket.writableLength >= this.socket.writableHighWaterMark) this.full = true;
    return !this.full;
  }

  private readonly flush = (): void => {
    this.flushing = null;
    const data = this.out;
    this.out = '';
    if (this.closed || !data) return;
    this.socket.write(data);
    if (this.socket.writableLength > this.maxSendBuffer) {
      this.opts.onLimit?.('maxSendBuffer', { remote: this.remote, buffered: this.socket.writableLength, maxSendBuffer: this.maxSendBuffer });
      this.ended(`send buffer over ${this.maxSendBuffer} bytes: the peer is not reading`);
      return;
    }
    // The socket took it all without asking for a drain: the one owed is due now.
    if (this.full && !this.socket.writableNeedDrain) {
      this.full = false;
      this.h?.drain();
    }
  };

  pause(): void {
    this.socket.pause();
  }

  resume(): void {
    this.socket.resume();
  }

  setHandlers(h: LinkHandlers | null): void {
    this.h = h;
  }

  close(_reason: string): void {
    if (this.closed) return;
    this.closed = true;
    this.h = null;
    this.cancelFlush();
    this.socket.destroy();
  }

  private cancelFlush(): void {
    if (this.flushing) clearImmediate(this.flushing);
    this.flushing = null;
    this.out = '';
  }

  private ended(reason: string): void {
    if (this.closed) return;
    this.closed = true;
    this.cancelFlush();
    this.socket.destroy();
    const h = this.h;
    this.h = null;
    h?.close(reason);
  }
}


/** TLS for device links. Paths are read when the server starts. */
export interface TlsOptions {
  /** PEM private key file. */
  key: string;
  /** PEM certificate (chain) file the server presents. */
  cert: string;
  /** PEM CA file that client certificates must chain to. Default: none (no client certificates). */
  ca?: string;
  /**
   * `off`: no client certificates (default). `optional`: a device may present one
   * signed by `ca`; if it verifies, it proves the ID it names. `required`: a link
   * without a valid client certificate is refused during the handshake.
   */
  clientCerts?: 'off' | 'optional' | 'required';
  /** Certificate subject CN → client ID it proves. Default: the CN is the client ID. */
  certIds?: Record<string, string>;
  /**
   * Port for TLS. Default: the server's `port`, which then speaks TLS only. A
   * different port serves TLS there and plain TCP on `port` (for a fleet moving
   * to TLS).
   */
  port?: number;
}

export const TLS_CLIENT_CERTS = ['off', 'optional', 'required'] as const;

export interface TcpListenOptions {
  host: string;
  port: number;
  logger: Logger;
  /** Serve TLS instead of plain TCP. */
  tls?: TlsOptions | null;
  /** ms a TLS handshake may take. Default 10000. */
  handshakeTimeout?: number;
  /** Asked for every new socket: null admits it, a limit name refuses it (the socket is closed at once). */
  admit?: (address: string) => LimitName | null;
  /** Told when an admitted socket closes. */
  release?: (address: string) => void;
  /** Told when a limit is hit inside the transport (TLS handshake failures, send buffer). */
  onLimit?: (name: LimitName, fields: Record<string, unknown>) => void;
  maxSendBuffer?: number;
}

/**
 * Reads a PEM file and checks that it holds what `what` needs (a private key,
 * or certificates), so a wrong or damaged file is named in the error instead
 * of surfacing later as a bare OpenSSL message. `where` is the option's path
 * in the config, e.g. `tls.key`.
 */
export function readPem(where: string, file: string): Buffer {
  let buf: Buffer;
  try {
    buf = fs.readFileSync(file);
  } catch (e) {
    throw new TetherError('ERR_BAD_CONFIG', `${where}: cannot read ${file} (${(e as NodeJS.ErrnoException).code ?? e}): check the path`);
  }
  try {
    if (where.endsWith('key')) crypto.createPrivateKey(buf);
    else new crypto.X509Certificate(buf);
  } catch (e) {
    const want = where.endsWith('key') ? 'a PEM private key (-----BEGIN PRIVATE KEY-----)' : 'a PEM certificate (-----BEGIN CERTIFICATE-----)';
    throw new TetherError('ERR_BAD_CONFIG', `${where}: ${file} is not ${want} (${(e as Error).message}): check that the file is the right one and complete`);
  }
  return buf;
}

/** Reads the PEM files named by `opts`, with an error that says which file is wrong. */
function secureContextOptions(opts: TlsOptions): tls.TlsOptions {
  const read = (what: string, file: string) => readPem(`tls.${what}`, file);
  const clientCerts = opts.clientCerts ?? 'off';
  if (clientCerts !== 'off' && !opts.ca) {
    throw new TetherError('ERR_BAD_CONFIG', `tls.clientCerts is "${clientCerts}" but tls.ca is not set: give the CA file client certificates are signed by`);
  }
  const out = {
    key: read('key', opts.key),
    cert: read('cert', opts.cert),
    ca: opts.ca ? read('ca', opts.ca) : undefined,
    requestCert: clientCerts !== 'off',
    rejectUnauthorized: clientCerts === 'required',
  };
  try {
    tls.createSecureContext(out);
  } catch (e) {
    throw new TetherError('ERR_BAD_CONFIG', `tls: ${opts.key} and ${opts.cert} do not make a TLS identity (${(e as Error).message}): the key must be the one the certificate was made for`);
  }
  return out;
}

/** Accepts TCP (or TLS) connections and hands each one, as a link, to `accept`. */
export class TcpTransport {
  private readonly srv: net.Server;
  private readonly sockets = new Set<net.Socket>();
  private readonly refused = new WeakSet<net.Socket>();
  /** TLS only: raw sockets still in their handshake, by `address|port`, with the timer that closes them at the deadline. */
  private readonly handshaking = new Map<string, { raw: net.Socket; timer: NodeJS.Timeout }>();
  private readonly handshakeTimeout: number;

  constructor(
    private readonly accept: (link: Link) => void,
    private readonly opts: TcpListenOptions,
  ) {
    const linkOpts = (certId: string | null): TcpLinkOptions => ({ maxSendBuffer: opts.maxSendBuffer, onLimit: opts.onLimit, certId });
    this.handshakeTimeout = opts.handshakeTimeout ?? 10_000;
    if (opts.tls) {
      const t = opts.tls;
      // Node's own handshakeTimeout is an inactivity timer (a peer trickling bytes resets it) and it
      // only reports, it does not close: the deadline is ours (handshakeDeadline below).
      const srv = tls.createServer({ ...secureContextOptions(t), handshakeTimeout: 0 }, (socket) => {
        this.handshakeDone(socket);
        if (socket.destroyed) return;
        let certId: string | null = null;
        if (socket.authorized) {
          const cn = socket.getPeerCertificate()?.subject?.CN;
          const name = Array.isArray(cn) ? cn[0] : cn;
          if (name) certId = t.certIds?.[name] ?? name;
        }
        this.accept(new TcpLink(socket, linkOpts(certId)));
      });
      srv.on('tlsClientError', (err: NodeJS.ErrnoException, socket: tls.TLSSocket) => {
        // Node keeps the raw socket under `_parent`; the TLS socket has lost its address by now.
        const raw = (socket as unknown as { _parent?: net.Socket })?._parent;
        // A failed handshake frees its slot now, whatever Node does with the socket afterwards.
        this.handshakeDone(raw ?? socket);
        socket?.destroy();
        raw?.destroy();
        if (raw && this.refused.has(raw)) return;
        opts.onLimit?.('tlsHandshake', {
          remote: raw?.remoteAddress ?? socket?.remoteAddress,
          error: err.code ?? err.message,
          hint: 'the device must speak TLS to this port and trust the server certificate (and present a client certificate if tls.clientCerts is "required")',
        });
      });
      this.srv = srv;
    } else {
      this.srv = net.createServer((socket) => {
        if (socket.destroyed) return;
        this.accept(new TcpLink(socket, linkOpts(null)));
      });
    }
    // Admission runs before the TLS handshake (or the plain link): refused sockets cost nothing more.
    this.srv.prependListener('connection', (socket: net.Socket) => {
      socket.on('error', () => {}); // errors of refused or half-made sockets are reported by the link, if any
      const address = socket.remoteAddress ?? 'unknown';
      const refuse = opts.admit?.(address) ?? null;
      if (refuse) {
        this.refused.add(socket);
        socket.destroy();
        return;
      }
      this.sockets.add(socket);
      if (opts.tls) this.handshakeDeadline(socket);
      socket.once('close', () => {
        this.sockets.delete(socket);
        opts.release?.(address);
      });
    });
    // Listen errors are reported by listen(); later ones are logged here.
    this.srv.on('error', (err) => {
      if (this.srv.listening) opts.logger.error('TCP listener error', { err });
    });
  }

  /**
   * A TLS socket must finish its handshake within `handshakeTimeout` ms of arriving,
   * however it spends them (silent, half a ClientHello, a byte now and then): at
   * the deadline it is closed, counted as `tlsHandshake`, and its slot is free.
   */
  private handshakeDeadline(raw: net.Socket): void {
    const key = `${raw.remoteAddress}|${raw.remotePort}`;
    const timer = setTimeout(() => {
      if (this.handshaking.get(key)?.raw !== raw) return;
      this.handshaking.delete(key);
      if (raw.destroyed) return;
      this.refused.add(raw); // closed by us: not counted a second time as a failed handshake
      raw.destroy();
      this.opts.onLimit?.('tlsHandshake', {
        remote: raw.remoteAddress,
        error: `no TLS handshake within ${this.handshakeTimeout} ms`,
        handshakeTimeout: this.handshakeTimeout,
        hint: 'the device must start TLS at once on this port; the deadline is idTimeout',
      });
    }, this.handshakeTimeout);
    timer.unref?.();
    this.handshaking.set(key, { raw, timer });
    raw.once('close', () => {
      const h = this.handshaking.get(key);
      if (h?.raw !== raw) return;
      clearTimeout(h.timer);
      this.handshaking.delete(key);
    });
  }

  /** The handshake of the socket `s` is over (done or failed): no deadline any more. */
  private handshakeDone(s: net.Socket | undefined): void {
    if (!s) return;
    const key = `${s.remoteAddress}|${s.remotePort}`;
    const h = this.handshaking.get(key);
    if (!h) return;
    clearTimeout(h.timer);
    this.handshaking.delete(key);
  }

  /** Sockets still in their TLS handshake (0 for plain TCP). */
  get tlsHandshakes(): number {
    return this.handshaking.size;
  }

  /** Sockets open right now (handshaking or attached). */
  get openSockets(): number {
    return this.sockets.size;
  }

  get isTls(): boolean {
    return !!this.opts.tls;
  }

  listen(): Promise<AddressInfo> {
    return new Promise((resolve, reject) => {
      const fail = (err: NodeJS.ErrnoException) => {
        const hint =
          err.code === 'EADDRINUSE'
            ? `port ${this.opts.port} is in use: stop the other server or choose another port`
            : err.code === 'EADDRNOTAVAIL'
              ? `host ${this.opts.host} is not an address of this machine: use 0.0.0.0, 127.0.0.1 or one of its own`
              : 'check host and port';
        reject(new Error(`cannot listen on ${this.opts.host}:${this.opts.port} (${err.code ?? err.message}): ${hint}`));
      };
      this.srv.once('error', fail);
      this.srv.listen(this.opts.port, this.opts.host, () => {
        this.srv.off('error', fail);
        resolve(this.srv.address() as AddressInfo);
      });
    });
  }

  address(): AddressInfo | null {
    return this.srv.address() as AddressInfo | null;
  }

  /** Stops accepting new sockets; those already open carry on until close(). */
  stopListening(): void {
    if (this.srv.listening) this.srv.close();
  }

  /** Stops accepting and destroys every socket still open. */
  close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    return new Promise((resolve) => {
      if (!this.srv.listening) return resolve();
      this.srv.close(() => resolve());
    });
  }
}
