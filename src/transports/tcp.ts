/**
 * TCP: sockets in, links out. Nothing here knows what an ACK or an ID line is.
 */
import * as net from 'node:net';
import type { AddressInfo } from 'node:net';
import type { Link, LinkHandlers } from '../link';
import type { Logger } from '../log';

/** One TCP socket as a link. */
export class TcpLink implements Link {
  readonly remote: string;
  private h: LinkHandlers | null = null;
  private closed = false;
  /** Lines written during this turn of the event loop, sent together by one socket write. */
  private out = '';
  private flushing: NodeJS.Immediate | null = null;

  constructor(readonly socket: net.Socket) {
    this.remote = `tcp:${socket.remoteAddress}:${socket.remotePort}`;
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => this.h?.data(chunk));
    socket.on('drain', () => this.h?.drain());
    socket.on('error', (err: NodeJS.ErrnoException) => this.ended(`socket error: ${err.code ?? err.message}`));
    socket.on('end', () => this.ended('peer closed the socket'));
    socket.on('close', () => this.ended('socket closed'));
  }

  get isClosed(): boolean {
    return this.closed;
  }

  write(data: string): boolean {
    if (this.closed) return true;
    this.out += data;
    this.flushing ??= setImmediate(this.flush);
    return !this.socket.writableNeedDrain;
  }

  private readonly flush = (): void => {
    this.flushing = null;
    const data = this.out;
    this.out = '';
    if (!this.closed && data) this.socket.write(data);
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

export interface TcpListenOptions {
  host: string;
  port: number;
  logger: Logger;
}

/** Accepts TCP connections and hands each one, as a link, to `accept`. */
export class TcpTransport {
  private readonly srv: net.Server;
  private readonly sockets = new Set<net.Socket>();

  constructor(
    private readonly accept: (link: Link) => void,
    private readonly opts: TcpListenOptions,
  ) {
    this.srv = net.createServer((socket) => {
      this.sockets.add(socket);
      socket.once('close', () => this.sockets.delete(socket));
      this.accept(new TcpLink(socket));
    });
    // Listen errors are reported by listen(); later ones are logged here.
    this.srv.on('error', (err) => {
      if (this.srv.listening) opts.logger.error('TCP listener error', { err });
    });
  }

  /** Sockets open right now (handshaking or attached). */
  get openSockets(): number {
    return this.sockets.size;
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

  /** Stops accepting and destroys every socket still open. */
  close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    return new Promise((resolve) => {
      if (!this.srv.listening) return resolve();
      this.srv.close(() => resolve());
    });
  }
}
