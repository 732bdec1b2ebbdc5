/**
 * UART transport: the serial line to the root node of an ESP mesh
 * (PROTOCOL.md section 2). Each mesh node's line-protocol bytes become one link,
 * handed to the Server like a TCP socket, so a mesh node is an ordinary
 * Connection. Mesh-level events (nodes joining and leaving, root resets, DATA
 * frames) and the root's commands are exposed here.
 */
import { EventEmitter } from 'node:events';
import { SerialPort } from 'serialport';
import { TetherError } from '../errors';
import { throttledWarn } from '../limits';
import type { Link, LinkHandlers } from '../link';
import type { Logger } from '../log';
import {
  BodyError,
  commandBody,
  encodeFrame,
  FrameDecoder,
  parseRootBody,
  RootCommand,
  RootMessage,
} from '../protocol/frames';
import type { Server } from '../server';
import { DataTypeTable, Telemetry, TelemetryValue } from '../telemetry';
import { preview, sleep } from '../util';

export interface MeshOptions {
  /** Serial device of the mesh root, e.g. /dev/ttyUSB0. Required. */
  path: string;
  /** Default 115200. */
  baudRate?: number;
  /** Default 8. */
  dataBits?: 5 | 6 | 7 | 8;
  /** Default 1. */
  stopBits?: 1 | 1.5 | 2;
  /** Default "none". */
  parity?: 'none' | 'even' | 'odd' | 'mark' | 'space';
  /** Hardware flow control. Default false. */
  rtscts?: boolean;
  /** Largest frame body accepted, bytes; larger frames are dropped and counted. Default 4096. */
  maxFrame?: number;
  /** Command used for a node's data: `SEND-` (no mesh-level tracking) or `SENDI` (the root retries up to 3 times). Default `SEND-`. */
  send?: 'SEND-' | 'SENDI';
  /**
   * ms to wait for the root's RESULT to a command. Node traffic is held while a
   * root command waits, so keep it well under the timeout. Default timeout / 2.
   */
  commandTimeout?: number;
  /** Commands awaiting a RESULT before node links report themselves full. Default 64. */
  maxOutstanding?: number;
  /** ms before the first reopen of a lost port; doubles up to reopenMax. Default 500. */
  reopenMin?: number;
  /** Default 10000. */
  reopenMax?: number;
  /**
   * ms during which a node's line data is ignored after its link ended (or the
   * transport started, or the root reset), so the node has surely noticed the
   * outage and starts again with its ID line. Default 2 × the server's timeout.
   */
  quarantine?: number;
  /** Bytes held for a node whose Connection has paused reading; more are dropped (qos resends them). Default 65536. */
  maxHeld?: number;
  /** Data-type table for DATA frames (a table or a JSON file path). Default: none (DATA frames are counted and dropped). */
  dataTypes?: DataTypeTable | string;
  /** Samples kept per telemetry name and node. Default 1000. */
  telemetryHistory?: number;
}

export interface MeshNode {
  addr: number;
  uuid?: string;
  /** In the mesh, as far as the root has told us. */
  present: boolean;
  lastSeen: number;
  /** Client ID of the Connection its link feeds, once known. */
  clientId?: string;
  telemetry: Telemetry;
}

export interface MeshStats {
  framesIn: number;
  framesOut: number;
  badBodies: number;
  unknownOpcodes: number;
  dataFrames: number;
  resultsOk: number;
  resultsFailed: number;
  resultsTimedOut: number;
  resultsUnexpected: number;
  /** Line bytes ignored while a node was in quarantine. */
  quarantinedBytes: number;
  /** Line bytes dropped because a paused node's hold was full. */
  heldDropped: number;
  /**
   * Lines to nodes not sent because their frame would exceed maxFrame (the root
   * would drop it). Stays 0: node Connections refuse such lines at write() (see
   * meshMaxLine); a count here means something bypassed that check.
   */
  oversizedOut: number;
  opens: number;
  portLosses: number;
}

export class MeshCommandError extends TetherError {
  constructor(
    readonly command: string,
    readonly rootMessage: string,
  ) {
    super('ERR_MESH_COMMAND', `mesh root refused ${command}: ${rootMessage}`);
  }
}

interface RootCall {
  cmd: RootCommand;
  addr: number;
  data?: Uint8Array;
  resolve: () => void;
  reject: (e: Error) => void;
}

interface Outstanding {
  cmd: RootCommand;
  at: number;
  resolve?: () => void;
  reject?: (e: Error) => void;
}

const hex4 = (a: number) => '0x' + a.toString(16).padStart(4, '0');

/** A SEND frame body: command (5 bytes) and node address (2), then the line-protocol bytes. */
const COMMAND_HEADER = 7;

/** Bytes a node's line costs in a frame body besides the line itself: the command and address (7) and the line's `\n` (1). */
export const MESH_LINE_OVERHEAD = COMMAND_HEADER + 1;

/**
 * The longest line (bytes without its `\n`, message id included: what
 * maxLineLength counts) that fits in one SEND frame of at most `maxFrame` bytes.
 * A node's link announces it, so its Connection refuses longer writes up front
 * instead of sending a frame the root drops (and retransmitting it forever).
 */
export function meshMaxLine(maxFrame: number): number {
  return maxFrame - MESH_LINE_OVERHEAD;
}

/** One mesh node's line-protocol stream, as a link. */
class MeshLink implements Link {
  readonly remote: string;
  /** The longest line one frame carries (maxFrame − command, address and `\n`). */
  readonly maxLineLength: number;
  private h: LinkHandlers | null = null;
  private closed = false;
  private paused = false;
  private held: Buffer[] = [];
  private heldBytes = 0;

  constructor(
    private readonly mesh: MeshTransport,
    readonly addr: number,
  ) {
    this.remote = `mesh:${hex4(addr)}`;
    this.maxLineLength = mesh.maxLineLength;
  }

  write(data: string): boolean {
    if (this.closed) return true;
    return this.mesh.sendToNode(this.addr, data);
  }

  pause(): void {
    this.paused = true;
  }

  resume(): void {
    this.paused = false;
    const held = this.held;
    this.held = [];
    this.heldBytes = 0;
    for (const chunk of held) {
      if (this.paused || this.closed) {
        this.deliver(chunk);
        continue;
      }
      this.h?.data(chunk);
    }
  }

  setHandlers(h: LinkHandlers | null): void {
    this.h = h;
  }

  /** Line bytes from the node. */
  deliver(chunk: Buffer): void {
    if (this.closed) return;
    if (!this.paused) {
      this.h?.data(chunk);
      return;
    }
    if (this.heldBytes + chunk.length > this.mesh.maxHeld) {
      this.mesh.stats.heldDropped += chunk.length;
      return;
    }
    this.held.push(chunk);
    this.heldBytes += chunk.length;
  }

  drained(): void {
    this.h?.drain();
  }

  /** Closed by its owner (outage, duplicate ID…). */
  close(reason: string): void {
    if (this.closed) return;
    this.closed = true;
    this.h = null;
    this.mesh.linkEnded(this, reason);
  }

  /** Ended from the mesh side (node left, root reset, port lost). */
  end(reason: string): void {
    if (this.closed) return;
    this.closed = true;
    const h = this.h;
    this.h = null;
    this.mesh.linkEnded(this, reason);
    h?.close(reason);
  }
}

export class MeshTransport extends EventEmitter {
  readonly nodes = new Map<number, MeshNode>();
  readonly stats: MeshStats = {
    framesIn: 0,
    framesOut: 0,
    badBodies: 0,
    unknownOpcodes: 0,
    dataFrames: 0,
    resultsOk: 0,
    resultsFailed: 0,
    resultsTimedOut: 0,
    resultsUnexpected: 0,
    quarantinedBytes: 0,
    heldDropped: 0,
    oversizedOut: 0,
    opens: 0,
    portLosses: 0,
  };
  readonly maxHeld: number;
  private readonly log: Logger;
  private readonly decoder: FrameDecoder;
  private readonly table?: DataTypeTable;
  private readonly links = new Map<number, MeshLink>();
  /** Per node: ignore line data until this time; absent = use `quietAll`. */
  private readonly quietUntil = new Map<number, number>();
  private quietAll = 0;
  private readonly fifo: Outstanding[] = [];
  /** Root commands (BCAST, RST-R, CLEAN, NINFO) waiting for their turn; each runs alone. */
  private readonly calls: RootCall[] = [];
  private callBusy = false;
  /** Node data held back while a root command is waiting or running. */
  private held: Array<{ addr: number; data: Buffer }> = [];
  private lastNetInfo: Array<{ addr: number; uuid: string }> = [];
  private port: SerialPort | null = null;
  private portWritable = true;
  private closed = false;
  private loop: Promise<void> | null = null;
  private readonly stop = new AbortController();
  private timer: NodeJS.Timeout | null = null;
  private readonly opts: Required<Omit<MeshOptions, 'dataTypes' | 'quarantine'>> & { quarantine: number };

  constructor(
    private readonly server: Server,
    options: MeshOptions,
  ) {
    super();
    if (!options.path) throw new TetherError('ERR_BAD_CONFIG', 'mesh: "path" (the serial device of the mesh root) is required');
    this.log = server.log.child({ mesh: options.path });
    const timeout = server.opts.timeout ?? 2000;
    this.opts = {
      path: options.path,
      baudRate: options.baudRate ?? 115200,
      dataBits: options.dataBits ?? 8,
      stopBits: options.stopBits ?? 1,
      parity: options.parity ?? 'none',
      rtscts: options.rtscts ?? false,
      maxFrame: options.maxFrame ?? 4096,
      send: options.send ?? 'SEND-',
      commandTimeout: options.commandTimeout ?? Math.floor(timeout / 2),
      maxOutstanding: options.maxOutstanding ?? 64,
      reopenMin: options.reopenMin ?? 500,
      reopenMax: options.reopenMax ?? 10000,
      quarantine: options.quarantine ?? 2 * timeout,
      maxHeld: options.maxHeld ?? 65536,
      telemetryHistory: options.telemetryHistory ?? 1000,
    };
    if (!Number.isInteger(this.opts.maxFrame) || this.opts.maxFrame < 16 || this.opts.maxFrame > 1 << 20) {
      throw new TetherError('ERR_BAD_CONFIG', `mesh: "maxFrame" must be an integer from 16 to ${1 << 20} (the root's frame buffer, default 4096), got ${JSON.stringify(this.opts.maxFrame)}`);
    }
    if (this.opts.send !== 'SEND-' && this.opts.send !== 'SENDI') {
      throw new TetherError('ERR_BAD_CONFIG', `mesh: "send" must be "SEND-" or "SENDI", got ${JSON.stringify(this.opts.send)}`);
    }
    this.maxHeld = this.opts.maxHeld;
    if (this.opts.commandTimeout > 0.6 * timeout) {
      this.log.warn('mesh commandTimeout is close to the keepalive timeout', {
        commandTimeout: this.opts.commandTimeout,
        timeout,
        hint: 'node traffic waits while a root command is unanswered; nodes may see an outage. Use at most timeout / 2',
      });
    }
    this.decoder = new FrameDecoder(this.opts.maxFrame);
    this.table = typeof options.dataTypes === 'string' ? DataTypeTable.load(options.dataTypes) : options.dataTypes;
    server.on('attach', (conn: { id: string }, link: Link) => {
      if (link instanceof MeshLink) this.node(link.addr).clientId = conn.id;
    });
  }

  /** The longest line a node's link carries in one frame: maxFrame − 8 (4088 by default). */
  get maxLineLength(): number {
    return meshMaxLine(this.opts.maxFrame);
  }

  /** Frame decoder counters: frames, noise bytes, restarted, oversized, bad escapes. */
  get framing() {
    return this.decoder.stats;
  }

  get isOpen(): boolean {
    return this.port !== null;
  }

  /** Starts the transport; resolves once the port is open (it keeps retrying, logging why). */
  open(): Promise<void> {
    const opened = new Promise<void>((resolve) => this.once('open', resolve));
    this.loop ??= this.run();
    return opened;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.stop.abort();
    const port = this.port;
    this.port = null;
    if (port?.isOpen) await new Promise<void>((r) => port.close(() => r()));
    this.loseLinks('mesh transport closed');
    this.failOutstanding(new TetherError('ERR_CLOSED', 'mesh transport closed'));
    await this.loop;
  }

  // ---- commands (PROTOCOL.md 2.3) ------------------------------------------

  /** Delivers line-protocol bytes to every node (`BCAST`). */
  broadcast(data: string | Uint8Array): Promise<void> {
    return this.command('BCAST', 0, typeof data === 'string' ? Buffer.from(data) : data);
  }

  /** Restarts the root (`RST-R`). */
  resetRoot(): Promise<void> {
    return this.command('RST-R', 0);
  }

  /** Clears the mesh's persistent state (`CLEAN`). */
  clean(): Promise<void> {
    return this.command('CLEAN', 0);
  }

  /** Asks for NET_INFO (`NINFO`); resolves with the nodes the root reported. */
  async netInfo(): Promise<Array<{ addr: number; uuid: string }>> {
    await this.command('NINFO', 0);
    return this.lastNetInfo;
  }

  // ---- for MeshLink --------------------------------------------------------

  sendToNode(addr: number, data: string): boolean {
    if (!this.port) return true; // the link is about to be ended with the port
    const bytes = Buffer.from(data);
    if (COMMAND_HEADER + bytes.length > this.opts.maxFrame) {
      // The root would drop the frame; never put it on the line.
      this.stats.oversizedOut++;
      throttledWarn(this.log, 'line to a mesh node too long for one frame: not sent', {
        node: hex4(addr),
        bytes: bytes.length,
        maxFrame: this.opts.maxFrame,
        hint: `lines to mesh nodes must fit maxLineLength ${this.maxLineLength}; the Connection should have refused it at write()`,
      });
      return true;
    }
    if (this.callBusy || this.calls.length > 0) {
      this.held.push({ addr, data: bytes });
      return false;
    }
    this.write(this.opts.send, addr, bytes);
    return this.portWritable && this.fifo.length < this.opts.maxOutstanding;
  }

  linkEnded(link: MeshLink, reason: string): void {
    if (this.links.get(link.addr) !== link) return;
    this.links.delete(link.addr);
    this.quietUntil.set(link.addr, Date.now() + this.opts.quarantine);
    this.log.debug('mesh link ended', { node: hex4(link.addr), reason });
  }

  // ---- internals -------------------------------------------------------------

  private node(addr: number): MeshNode {
    let n = this.nodes.get(addr);
    if (!n) {
      n = { addr, present: true, lastSeen: Date.now(), telemetry: new Telemetry(this.opts.telemetryHistory) };
      this.nodes.set(addr, n);
    }
    return n;
  }

  private async run(): Promise<void> {
    let delay = this.opts.reopenMin;
    while (!this.closed) {
      let lost: Promise<string>;
      try {
        ({ lost } = await this.openPort());
      } catch (e) {
        this.log.warn('cannot open the mesh serial port: retrying', {
          error: (e as Error).message,
          retryIn: delay,
          hint: 'check the path, that the root is plugged in, and permissions (dialout group)',
        });
        await sleep(delay, this.stop.signal);
        delay = Math.min(delay * 2, this.opts.reopenMax);
        continue;
      }
      delay = this.opts.reopenMin;
      const why = await lost;
      if (this.closed) return;
      this.stats.portLosses++;
      this.log.warn('mesh serial port lost: every mesh link is in outage until it is back', { reason: why });
      this.loseLinks(`serial port lost (${why})`);
      this.failOutstanding(new TetherError('ERR_MESH_PORT', `mesh serial port lost (${why}); the command may not have reached the root`));
      await sleep(delay, this.stop.signal);
    }
  }

  /** Opens the port; resolves with a promise of why it was later lost. */
  private openPort(): Promise<{ lost: Promise<string> }> {
    return new Promise((resolve, reject) => {
      const port = new SerialPort({
        path: this.opts.path,
        baudRate: this.opts.baudRate,
        dataBits: this.opts.dataBits,
        stopBits: this.opts.stopBits,
        parity: this.opts.parity,
        rtscts: this.opts.rtscts,
        autoOpen: false,
      });
      port.open((err) => {
        if (err) return reject(err);
        if (this.closed) {
          port.close();
          return reject(new Error('closed'));
        }
        this.port = port;
        this.portWritable = true;
        this.stats.opens++;
        // Whatever the nodes were doing, their sessions did not survive: wait for fresh ID lines.
        this.quietUntil.clear();
        this.quietAll = Date.now() + this.opts.quarantine;
        const lost = new Promise<string>((done) => {
          const gone = (why: string) => {
            if (this.port === port) this.port = null;
            port.removeAllListeners('data');
            if (port.isOpen) port.close(() => done(why));
            else done(why);
          };
          port.once('close', (e?: Error) => gone(e?.message ?? 'closed'));
          port.on('error', (e: Error) => gone(e.message));
        });
        port.on('data', (chunk: Buffer) => this.decoder.push(chunk, this.onFrame, this.onDrop));
        port.on('drain', () => {
          this.portWritable = true;
          this.drainLinks();
        });
        this.log.info('mesh serial port open', { baudRate: this.opts.baudRate });
        this.emit('open');
        resolve({ lost });
      });
    });
  }

  private readonly onDrop = (why: string): void => {
    throttledWarn(this.log, 'dropped a damaged frame from the mesh root', { why });
  };

  private readonly onFrame = (body: Buffer): void => {
    this.stats.framesIn++;
    let m: RootMessage;
    try {
      m = parseRootBody(body, this.table?.lengthOf);
    } catch (e) {
      if (!(e instanceof BodyError)) throw e;
      this.stats.badBodies++;
      throttledWarn(this.log, 'dropped a malformed frame from the mesh root', { error: e.message, frame: preview(body) });
      return;
    }
    switch (m.op) {
      case 'line':
        this.onLine(m.addr, m.data);
        break;
      case 'node-up': {
        const n = this.node(m.addr);
        n.uuid = m.uuid;
        n.present = true;
        n.lastSeen = Date.now();
        this.quietUntil.set(m.addr, 0); // a node that just joined starts with its ID line
        this.log.info('mesh node up', { node: hex4(m.addr), uuid: m.uuid });
        this.emit('node-up', n);
        break;
      }
      case 'node-down': {
        const n = this.node(m.addr);
        n.present = false;
        this.links.get(m.addr)?.end('node left the mesh');
        this.log.info('mesh node down', { node: hex4(m.addr), client: n.clientId });
        this.emit('node-down', n);
        break;
      }
      case 'root-reset':
        throttledWarn(this.log, 'mesh root reset: every mesh link is in outage');
        this.loseLinks('mesh root reset');
        this.quietUntil.clear();
        this.quietAll = Date.now() + this.opts.quarantine;
        this.failOutstanding(new TetherError('ERR_MESH_RESET', 'the mesh root reset before answering; send the command again'));
        this.emit('root-reset');
        break;
      case 'net-info':
        this.lastNetInfo = m.nodes;
        for (const { addr, uuid } of m.nodes) {
          const n = this.node(addr);
          n.uuid = uuid;
          n.present = true;
        }
        this.emit('net-info', m.nodes);
        break;
      case 'result':
        this.onResult(m.ok, m.ok ? '' : m.error);
        break;
      case 'data':
        this.onData(m.addr, m.items);
        break;
      case 'unknown':
        this.stats.unknownOpcodes++;
        throttledWarn(this.log, 'skipped a frame with an unknown opcode', { node: hex4(m.addr), opcode: m.opcode });
        break;
    }
  };

  private onLine(addr: number, data: Buffer): void {
    const n = this.node(addr);
    n.lastSeen = Date.now();
    let link = this.links.get(addr);
    if (!link) {
      const quiet = this.quietUntil.get(addr) ?? this.quietAll;
      if (Date.now() < quiet) {
        this.stats.quarantinedBytes += data.length;
        return;
      }
      link = new MeshLink(this, addr);
      this.links.set(addr, link);
      this.server.accept(link);
    }
    link.deliver(data);
  }

  private onData(addr: number, items: Array<{ type: number; raw: Buffer }>): void {
    this.stats.dataFrames++;
    if (!this.table) {
      this.log.debug('DATA frame ignored: no data-type table configured', { node: hex4(addr) });
      return;
    }
    const n = this.node(addr);
    n.lastSeen = Date.now();
    const conn = n.clientId !== undefined ? this.server.get(n.clientId) : undefined;
    const values: Record<string, TelemetryValue> = {};
    const t = Date.now();
    for (const { type, raw } of items) {
      const { name, value } = this.table.decode(type, raw);
      values[name] = value;
      n.telemetry.record(name, value, t);
      conn?.record(name, value, t);
    }
    this.emit('data', n, values);
  }

  private onResult(ok: boolean, error: string): void {
    const head = this.fifo.shift();
    if (!head) {
      this.stats.resultsUnexpected++;
      throttledWarn(this.log, 'RESULT from the mesh root with no command waiting', { ok, error });
      return;
    }
    if (ok) {
      this.stats.resultsOk++;
      head.resolve?.();
    } else {
      this.stats.resultsFailed++;
      throttledWarn(this.log, 'mesh root refused a command', { command: head.cmd, error });
      head.reject?.(new MeshCommandError(head.cmd, error));
    }
    this.nextCall();
    if (this.fifo.length < this.opts.maxOutstanding) this.drainLinks();
  }

  /**
   * Root commands run one at a time with nothing else in flight: node data is
   * held while one waits, so the RESULT that comes back can only be its own,
   * even when an earlier RESULT was lost.
   */
  private command(cmd: RootCommand, addr: number, data?: Uint8Array): Promise<void> {
    if (!this.port) {
      return Promise.reject(
        new TetherError('ERR_MESH_PORT', `cannot send ${cmd}: the mesh serial port is not open (see the log for why)`),
      );
    }
    return new Promise((resolve, reject) => {
      this.calls.push({ cmd, addr, data, resolve, reject });
      this.nextCall();
    });
  }

  private nextCall(): void {
    if (this.callBusy || this.fifo.length > 0 || !this.port) return;
    const call = this.calls.shift();
    if (!call) {
      this.flushHeld();
      return;
    }
    this.callBusy = true;
    const done = () => {
      this.callBusy = false;
      this.nextCall();
    };
    this.write(
      call.cmd,
      call.addr,
      call.data,
      () => (done(), call.resolve()),
      (e) => (done(), call.reject(e)),
    );
  }

  private flushHeld(): void {
    const held = this.held;
    this.held = [];
    for (const { addr, data } of held) this.write(this.opts.send, addr, data);
    this.drainLinks();
  }

  private write(cmd: RootCommand, addr: number, data?: Uint8Array, resolve?: () => void, reject?: (e: Error) => void): void {
    this.fifo.push({ cmd, at: Date.now(), resolve, reject });
    this.stats.framesOut++;
    if (!this.port!.write(encodeFrame(commandBody(cmd, addr, data)))) this.portWritable = false;
    if (!this.timer) {
      this.timer = setInterval(() => this.expire(), Math.max(10, this.opts.commandTimeout / 4));
      this.timer.unref?.();
    }
  }

  /** Gives up on commands whose RESULT is overdue (their RESULT frames were lost or never sent). */
  private expire(): void {
    const now = Date.now();
    while (this.fifo.length > 0 && now - this.fifo[0].at > this.opts.commandTimeout) {
      const head = this.fifo.shift()!;
      this.stats.resultsTimedOut++;
      this.log.warn('mesh root did not answer a command in time', { command: head.cmd, commandTimeout: this.opts.commandTimeout });
      head.reject?.(
        new TetherError(
          'ERR_MESH_TIMEOUT',
          `mesh root did not answer ${head.cmd} within ${this.opts.commandTimeout} ms: check the root's serial link and firmware`,
        ),
      );
    }
    if (this.fifo.length === 0 && this.timer) {
      clearInterval(this.timer);
      this.timer = null;
    }
    this.nextCall();
    this.drainLinks();
  }

  private failOutstanding(err: Error): void {
    this.held = [];
    this.callBusy = false;
    for (const o of this.fifo.splice(0)) o.reject?.(err);
    for (const c of this.calls.splice(0)) c.reject(err);
  }

  private loseLinks(reason: string): void {
    for (const link of [...this.links.values()]) link.end(reason);
  }

  private drainLinks(): void {
    if (!this.portWritable || this.fifo.length >= this.opts.maxOutstanding) return;
    if (this.callBusy || this.calls.length > 0) return;
    for (const link of this.links.values()) link.drained();
  }
}
