/**
 * Mesh-root emulator: plays the root node of an ESP mesh on a serial port, so the
 * UART side of tether (PROTOCOL.md section 2) can run without hardware.
 *
 * Every simulated mesh node is a real `Client` (src/client.ts) whose links are
 * carried in UART frames instead of TCP sockets: what the node writes leaves the
 * port as LINE frames, and the data of `SEND-`/`SENDI` (and `BCAST`) commands
 * addressed to it is fed to its link. The node therefore runs the whole line
 * protocol unchanged: ID line, keepalives, message ids, ACKs, qos resends,
 * outage detection and redial.
 *
 * How mesh events map onto a node's links:
 * - `addNode` / `nodeJoin`: NODE_UP (0x02, the node's UUID). A dial made while the
 *   node is in the mesh but not announced (after a root reset, or after it
 *   dropped its own link) sends NODE_UP first, then the link opens and the
 *   client sends its ID line in a LINE frame.
 * - `nodeLeave`: NODE_DOWN (0x04); the node's link closes (an outage for its
 *   client) and its dials fail until `nodeJoin`.
 * - `rootReset` (or the `RST-R` command): ROOT_RESET (0x03, addr 0); every link
 *   closes; each client redials after its pause and rejoins with NODE_UP.
 * - A node whose own client drops the link (it heard nothing for `timeout`, or
 *   `client.disconnect()`) leaves the mesh the way the original client drops its
 *   WiFi: NODE_DOWN now, NODE_UP when it redials.
 *
 * Commands from the server are answered in arrival order, each with exactly one
 * RESULT frame (`S`, or `F` + text), except those listed in `silentCommands`,
 * which are dropped as if lost on the wire: neither carried out nor answered.
 * Those in `failCommands` are not carried out and get `F`.
 *
 * Recording (`record` option): every chunk written to the port is appended to
 * the file as one JSON line `{"t": <ms since the emulator started>, "hex":
 * "<bytes as lowercase hex>"}` (one chunk = one frame, or one noise/raw write).
 * `replay()` writes such a dump back at the recorded times (divided by `speed`).
 * A dump can hold several sessions appended one after the other: where `t` goes
 * down, replay plays the next chunk right after the previous one and goes on
 * from there. See docs/emulator.md.
 */
import { createHash } from 'node:crypto';
import { EventEmitter } from 'node:events';
import * as fs from 'node:fs';
import { performance } from 'node:perf_hooks';
import type { Duplex } from 'node:stream';
import type { SerialPort as SerialPortType } from 'serialport';
import type { DeviceContext, DeviceFn } from './apps';
import { Client, ClientOptions } from './client';
import { TetherError } from './errors';
import type { Link, LinkHandlers } from './link';
import type { Logger } from './log';
import { silentLogger } from './log';
import { encodeFrame, FrameDecoder, Op, parseCommandBody, resultBody, rootBody } from './protocol/frames';
import type { DataType, DataTypeTable, TelemetryValue } from './telemetry';
import { shown, sleep } from './util';

export interface MeshRootEmulatorOptions {
  /** Serial port to open (e.g. one end of a socat pty pair). Give this or `stream`. */
  path?: string;
  /** Default 115200. */
  baudRate?: number;
  /** An already-open byte stream to use instead of a serial port (tests). close() does not end it. */
  stream?: Duplex;
  /** Line-protocol timeout of the simulated nodes, ms; must match the server's. Default 2000. */
  timeout?: number;
  /** Largest frame body, in bytes, read or written. Longer LINE data is split over several frames. Default 4096. */
  maxFrame?: number;
  /** Table for DATA frames (`sendData`, `dataEvery`). */
  dataTypes?: DataTypeTable;
  logger?: Logger;
  /** Commands (e.g. `['CLEAN']`) answered with RESULT `F` and not carried out. */
  failCommands?: string[];
  /** Commands dropped without an answer, as if lost on the wire. */
  silentCommands?: string[];
  /** Mesh address of the first node; the next ones count up. Default 1. */
  firstAddr?: number;
  /** Every this many ms, a DATA frame with a plausible value of every type in the table, per node. 0 = off (default). */
  dataEvery?: number;
  /** Every this many ms, a random node leaves the mesh and rejoins `churnDownFor` ms later. 0 = off (default). */
  churnEvery?: number;
  /** How long a churned node stays out, ms. Default: 2000-5000 at random. */
  churnDownFor?: number;
  /** Every this many ms, the root resets. 0 = off (default). */
  resetEvery?: number;
  /** Append every chunk written to the port to this file (JSON lines, see above). */
  record?: string;
  /** Period of the default device function's messages, ms. Default 3000. */
  chatterEvery?: number;
  /** Extra options for every node's Client (e.g. `reconnectDelay`, `maxLineLength`). */
  clientOptions?: Partial<Omit<ClientOptions, 'id' | 'dial'>>;
}

export interface AddNodeOptions {
  /** 16 bytes as 32 hex digits (dashes allowed). Default: derived from the id, stable across runs. */
  uuid?: string;
}

export interface EmulatorStats {
  /** Commands received, by their 5-character name (unknown ones too). */
  commands: Record<string, number>;
  resultsOk: number;
  resultsFailed: number;
  /** Commands dropped because of `silentCommands`. */
  silenced: number;
  /** Command frames too short to hold command + addr. */
  badCommands: number;
  framesIn: number;
  bytesIn: number;
  /** Frames the decoder threw away (cut short, oversized, bad escape). */
  framesDropped: number;
  framesOut: number;
  bytesOut: number;
  /** Line-protocol bytes carried node → server / server → node. */
  lineBytesUp: number;
  lineBytesDown: number;
  /** SEND-/SENDI/BCAST data that found no open link at its node. */
  undelivered: number;
  dataFrames: number;
  nodeUps: number;
  nodeDowns: number;
  rootResets: number;
}

export interface ReplayOptions {
  /** 1 = recorded pace, 2 = twice as fast; 0 or Infinity = as fast as possible. Default 1. */
  speed?: number;
}

export interface ReplayResult {
  chunks: number;
  bytes: number;
  /** False if close() stopped it early. */
  complete: boolean;
}

/** What `nodes()` reports about one simulated node. */
export interface NodeInfo {
  id: string;
  addr: number;
  uuid: string;
  /** In the mesh (not left by nodeLeave). */
  inMesh: boolean;
  /** NODE_UP sent and not yet undone by NODE_DOWN / ROOT_RESET. */
  announced: boolean;
  /** A line-protocol link is open. */
  linked: boolean;
  client: Client;
}

interface SimNode {
  id: string;
  addr: number;
  uuid: Buffer;
  client: Client;
  stop: AbortController;
  task: Promise<void>;
  left: boolean;
  announced: boolean;
  link: NodeLink | null;
  joinedAt: number;
  rejoinTimer: NodeJS.Timeout | null;
}

const COMMANDS = ['SEND-', 'SENDI', 'BCAST', 'RST-R', 'CLEAN', 'NINFO'];
/** Bytes a paused node link holds before it drops further data. */
const PAUSED_LIMIT = 1 << 20;

const hex4 = (addr: number) => '0x' + addr.toString(16).padStart(4, '0');

function badConfig(msg: string): TetherError {
  return new TetherError('ERR_BAD_CONFIG', `mesh emulator: ${msg}`);
}

function checkMs(name: string, v: number | undefined, min: number, dflt: number): number {
  const x = v ?? dflt;
  if (!Number.isFinite(x) || x < 0 || (x !== 0 && x < min)) {
    throw badConfig(`option ${name} must be 0 (off) or a number of ms >= ${min}, got ${shown(v)}`);
  }
  return x;
}

/**
 * One node's line-protocol link, carried in UART frames. The node's writes go out
 * as LINE frames; the emulator feeds it the data of commands addressed to it.
 */
class NodeLink implements Link {
  readonly remote: string;
  private h: LinkHandlers | null = null;
  private held: Buffer[] = [];
  private heldBytes = 0;
  private paused = false;
  private closed = false;
  private congested = false;

  constructor(
    private readonly emu: MeshRootEmulator,
    private readonly node: SimNode,
  ) {
    this.remote = `mesh:${hex4(node.addr)}`;
  }

  get isClosed(): boolean {
    return this.closed;
  }

  write(data: string): boolean {
    if (this.closed) return true;
    const ok = this.emu._lineFromNode(this.node, Buffer.from(data, 'utf8'));
    if (!ok) this.congested = true;
    return ok;
  }

  pause(): void {
    this.paused = true;
  }

  resume(): void {
    this.paused = false;
    this.flush();
  }

  setHandlers(h: LinkHandlers | null): void {
    this.h = h;
    this.flush();
  }

  /** The node's own side tears the link down (outage detected, client closed). */
  close(reason: string): void {
    if (this.closed) return;
    this.closed = true;
    this.h = null;
    this.held = [];
    this.emu._nodeClosedLink(this.node, this, reason);
  }

  /** Data from the server for this node. False if it was dropped. */
  deliver(data: Buffer): boolean {
    if (this.closed) return false;
    if (this.paused || !this.h || this.held.length > 0) {
      if (this.heldBytes + data.length > PAUSED_LIMIT) return false;
      this.held.push(data);
      this.heldBytes += data.length;
      this.flush();
      return true;
    }
    this.h.data(data);
    return true;
  }

  /** The mesh side ends the link (node left, root reset): the client sees an outage. */
  end(reason: string): void {
    if (this.closed) return;
    this.closed = true;
    const h = this.h;
    this.h = null;
    this.held = [];
    h?.close(reason);
  }

  /** The port drained after a write returned false. */
  drained(): void {
    if (!this.congested || this.closed) return;
    this.congested = false;
    this.h?.drain();
  }

  private flush(): void {
    while (!this.paused && this.h && this.held.length > 0 && !this.closed) {
      const d = this.held.shift()!;
      this.heldBytes -= d.length;
      this.h.data(d);
    }
  }
}

/** A device that writes a numbered JSON message every few seconds and logs what it receives. */
export function meshChatter(every = 3000): DeviceFn {
  return async (client: Client, ctx: DeviceContext) => {
    const reader = (async () => {
      for await (const line of client) ctx.log.info('node received', { line: line.trimEnd() });
    })();
    for (let n = 1; !ctx.signal.aborted; n++) {
      await client.write(JSON.stringify({ node: ctx.id, n, connects: client.connects }), { signal: ctx.signal }).catch(() => {});
      await sleep(every, ctx.signal);
    }
    await reader;
  };
}

function parseUuid(s: string): Buffer {
  const h = s.replace(/-/g, '');
  if (!/^[0-9a-fA-F]{32}$/.test(h)) throw badConfig(`uuid must be 32 hex digits (dashes allowed), got ${JSON.stringify(s)}`);
  return Buffer.from(h, 'hex');
}

/** A UUID that depends only on the node id (name-based, version 3 layout), so dumps are reproducible. */
function uuidFor(id: string): Buffer {
  const b = createHash('md5').update(`tether-mesh-node:${id}`).digest();
  b[6] = (b[6] & 0x0f) | 0x30;
  b[8] = (b[8] & 0x3f) | 0x80;
  return b;
}

const pick = <T>(xs: readonly T[]): T => xs[Math.floor(Math.random() * xs.length)];
const between = (lo: number, hi: number) => lo + Math.random() * (hi - lo);

const RANGES: Record<string, [number, number]> = {
  int8: [-128, 127],
  uint8: [0, 255],
  int16: [-32768, 32767],
  uint16: [0, 65535],
  int32: [-2147483648, 2147483647],
  uint32: [0, 4294967295],
};

/** A believable reading for a data type, guessed from its name, else from its encoding. */
export function plausibleValue(t: DataType, uptimeS = 0): TelemetryValue {
  const name = t.name.toLowerCase();
  if (t.encoding === 'bool') return Math.random() < 0.5;
  if (t.encoding === 'utf8') {
    const s = /status|state|mode/.test(name) ? pick(['ok', 'idle', 'busy', 'charging', 'low-batt']) : pick(['ok', 'hello', 'mesh']);
    return s.slice(0, t.length);
  }
  let v: number;
  if (/temp/.test(name)) v = between(17, 29);
  else if (/hum/.test(name)) v = between(30, 70);
  else if (/mv|millivolt/.test(name)) v = between(3300, 4200);
  else if (/batt|volt/.test(name)) v = between(3.3, 4.2);
  else if (/press/.test(name)) v = between(985, 1035);
  else if (/uptime/.test(name)) v = uptimeS;
  else if (/rssi/.test(name)) v = between(-90, -40);
  else if (/lux|light/.test(name)) v = between(0, 1000);
  else v = between(0, 100);
  const range = RANGES[t.encoding];
  if (!range) return Math.round(v * 100) / 100; // float32 / float64
  return Math.min(range[1], Math.max(range[0], Math.round(v)));
}

export class MeshRootEmulator extends EventEmitter {
  readonly stats: EmulatorStats = {
    commands: {},
    resultsOk: 0,
    resultsFailed: 0,
    silenced: 0,
    badCommands: 0,
    framesIn: 0,
    bytesIn: 0,
    framesDropped: 0,
    framesOut: 0,
    bytesOut: 0,
    lineBytesUp: 0,
    lineBytesDown: 0,
    undelivered: 0,
    dataFrames: 0,
    nodeUps: 0,
    nodeDowns: 0,
    rootResets: 0,
  };
  readonly timeout: number;
  readonly maxFrame: number;
  readonly dataTypes: DataTypeTable | undefined;
  private readonly log: Logger;
  private readonly failSet: Set<string>;
  private readonly silentSet: Set<string>;
  private readonly decoder: FrameDecoder;
  private readonly byId = new Map<string, SimNode>();
  private readonly byAddr = new Map<number, SimNode>();
  private nextAddr: number;
  private port: Duplex | null = null;
  private ownPort = false;
  private started = false;
  private closing = false;
  private closedP: Promise<void> | null = null;
  private t0 = 0;
  private recordFd: number | null = null;
  private readonly timers = new Set<NodeJS.Timeout>();
  private readonly stop = new AbortController();
  private readonly onPortData = (chunk: Buffer) => this.onData(chunk);
  private readonly onPortDrain = () => {
    for (const n of this.byId.values()) n.link?.drained();
    this.emit('drain');
  };
  private readonly onPortClose = () => this.portLost('the serial port closed');
  private readonly onPortError = (e: Error) => this.portLost(`serial port error: ${e.message}`);

  constructor(private readonly opts: MeshRootEmulatorOptions) {
    super();
    if (!opts.path === !opts.stream) throw badConfig('give exactly one of `path` (a serial port) and `stream`');
    this.timeout = opts.timeout ?? 2000;
    if (!Number.isInteger(this.timeout) || this.timeout < 4) throw badConfig(`timeout must be an integer >= 4 ms, got ${opts.timeout}`);
    this.maxFrame = opts.maxFrame ?? 4096;
    if (!Number.isInteger(this.maxFrame) || this.maxFrame < 32) throw badConfig(`maxFrame must be an integer >= 32, got ${opts.maxFrame}`);
    this.nextAddr = opts.firstAddr ?? 1;
    if (!Number.isInteger(this.nextAddr) || this.nextAddr < 1 || this.nextAddr > 0xffff) {
      throw badConfig(`firstAddr must be 1-65535 (0 is the broadcast address), got ${opts.firstAddr}`);
    }
    const baud = opts.baudRate ?? 115200;
    if (!Number.isInteger(baud) || baud <= 0) throw badConfig(`baudRate must be a positive integer, got ${opts.baudRate}`);
    checkMs('dataEvery', opts.dataEvery, 10, 0);
    checkMs('churnEvery', opts.churnEvery, 100, 0);
    checkMs('resetEvery', opts.resetEvery, 100, 0);
    if (opts.churnDownFor !== undefined) checkMs('churnDownFor', opts.churnDownFor, 1, 0);
    if ((opts.dataEvery ?? 0) > 0 && !opts.dataTypes) throw badConfig('dataEvery needs a dataTypes table');
    this.dataTypes = opts.dataTypes;
    this.log = opts.logger ?? silentLogger;
    this.failSet = new Set(opts.failCommands ?? []);
    this.silentSet = new Set(opts.silentCommands ?? []);
    this.decoder = new FrameDecoder(this.maxFrame);
  }

  /** Creates an emulator and opens its port. */
  static async open(opts: MeshRootEmulatorOptions): Promise<MeshRootEmulator> {
    const emu = new MeshRootEmulator(opts);
    await emu.start();
    return emu;
  }

  /** Frame decoder counters for what the server sent (noise, cut frames…). */
  get decoderStats() {
    return this.decoder.stats;
  }

  get isOpen(): boolean {
    return this.started && !this.closing;
  }

  /** Opens the port and starts the periodic timers. */
  async start(): Promise<void> {
    if (this.started) return;
    if (this.closing) throw new TetherError('ERR_CLOSED', 'mesh emulator: closed; create a new one');
    if (this.opts.stream) {
      this.port = this.opts.stream;
    } else {
      this.port = await this.openSerial(this.opts.path!, this.opts.baudRate ?? 115200);
      this.ownPort = true;
    }
    if (this.opts.record) {
      try {
        this.recordFd = fs.openSync(this.opts.record, 'a');
      } catch (e) {
        if (this.ownPort) await this.closePort();
        throw badConfig(`cannot open the record file ${this.opts.record} (${(e as Error).message})`);
      }
    }
    this.t0 = performance.now();
    this.started = true;
    this.port.on('data', this.onPortData);
    this.port.on('drain', this.onPortDrain);
    this.port.on('close', this.onPortClose);
    this.port.on('error', this.onPortError);
    this.every(this.opts.dataEvery ?? 0, () => this.periodicData());
    this.every(this.opts.churnEvery ?? 0, () => this.churn());
    this.every(this.opts.resetEvery ?? 0, () => {
      this.log.info('root reset (periodic)');
      this.rootReset();
    });
    this.log.info('mesh root emulator running', { port: this.opts.path ?? 'stream', timeout: this.timeout });
  }

  private openSerial(path: string, baudRate: number): Promise<SerialPortType> {
    if (!fs.existsSync(path)) {
      return Promise.reject(
        new TetherError(
          'ERR_MESH_PORT',
          `serial port ${path} does not exist. Without hardware, make a pseudo-terminal pair with ` +
            `"socat -d -d pty,raw,echo=0,link=/tmp/mesh-root pty,raw,echo=0,link=/tmp/mesh-server", ` +
            `run the emulator on /tmp/mesh-root and point the server at /tmp/mesh-server`,
        ),
      );
    }
    // Loaded here so that nothing else pays for the native binding.
    const { SerialPort } = require('serialport') as typeof import('serialport');
    return new Promise((resolve, reject) => {
      const port = new SerialPort({ path, baudRate, autoOpen: false });
      port.open((err) => {
        if (!err) return resolve(port);
        const hint = /lock|busy/i.test(err.message)
          ? 'another program has it open: stop it or use the other end of the pty pair'
          : /permission|EACCES/i.test(err.message)
            ? 'no permission: add yourself to the dialout group or fix the device permissions'
            : 'check the path';
        reject(new TetherError('ERR_MESH_PORT', `cannot open serial port ${path} (${err.message}): ${hint}`));
      });
    });
  }

  // ---- nodes ------------------------------------------------------------------

  /**
   * Adds a simulated node: a mesh address and UUID, NODE_UP, and a Client running
   * `fn` (default: a chatter) once its link is up.
   */
  addNode(id: string, fn?: DeviceFn, opts: AddNodeOptions = {}): NodeInfo {
    this.mustBeOpen('addNode');
    if (this.byId.has(id)) throw badConfig(`a node ${JSON.stringify(id)} already exists`);
    while (this.byAddr.has(this.nextAddr)) this.nextAddr++;
    if (this.nextAddr > 0xffff) throw badConfig('no mesh addresses left (16-bit)');
    const addr = this.nextAddr++;
    const uuid = opts.uuid ? parseUuid(opts.uuid) : uuidFor(id);
    const stop = new AbortController();
    const node: SimNode = {
      id,
      addr,
      uuid,
      stop,
      left: false,
      announced: false,
      link: null,
      joinedAt: Date.now(),
      rejoinTimer: null,
      task: Promise.resolve(),
      client: null as unknown as Client,
    };
    const clientOpts = this.opts.clientOptions ?? {};
    node.client = new Client({
      retryMax: Math.max(1000, 2 * this.timeout),
      ...clientOpts,
      id,
      timeout: this.timeout,
      logger: clientOpts.logger ?? this.log,
      dial: () => this.dial(node),
    });
    this.byId.set(id, node);
    this.byAddr.set(addr, node);
    this.announce(node);
    const device = fn ?? meshChatter(this.opts.chatterEvery ?? 3000);
    const ctx: DeviceContext = { id, log: this.log.child({ node: id }), signal: stop.signal };
    node.task = (async () => {
      await node.client.connect();
      await device(node.client, ctx);
    })().catch((e) => {
      if (!stop.signal.aborted && !node.client.isClosed) ctx.log.error('simulated node failed', { error: (e as Error).stack ?? String(e) });
    });
    return this.info(node);
  }

  /** Takes a node out for good: NODE_DOWN, its client stops. */
  async removeNode(id: string): Promise<void> {
    const node = this.node(id);
    if (node.announced) this.nodeDown(node);
    this.byId.delete(id);
    this.byAddr.delete(node.addr);
    this.untime(node);
    node.stop.abort();
    node.client.close();
    await node.task;
  }

  /** The node leaves the mesh: NODE_DOWN, its link closes, it cannot dial until nodeJoin. */
  nodeLeave(id: string): void {
    this.mustBeOpen('nodeLeave');
    const node = this.node(id);
    this.untime(node);
    if (node.left) return;
    node.left = true;
    this.log.info('node leaves the mesh', { node: id, addr: hex4(node.addr) });
    if (node.announced) this.nodeDown(node);
    node.link?.end('node left the mesh');
    node.link = null;
  }

  /** The node rejoins the mesh: NODE_UP; its client's next dial succeeds. False if it was not out. */
  nodeJoin(id: string): boolean {
    this.mustBeOpen('nodeJoin');
    const node = this.node(id);
    this.untime(node);
    if (!node.left) return false;
    node.left = false;
    node.joinedAt = Date.now();
    this.log.info('node rejoins the mesh', { node: id, addr: hex4(node.addr) });
    this.announce(node);
    return true;
  }

  /** The root restarts: ROOT_RESET, every node link closes; nodes rejoin as they redial. */
  rootReset(): void {
    this.mustBeOpen('rootReset');
    this.stats.rootResets++;
    this.writeFrame(rootBody(0, Op.ROOT_RESET));
    this.emit('root-reset');
    for (const node of this.byId.values()) {
      node.announced = false;
      node.link?.end('mesh root reset');
      node.link = null;
    }
  }

  /** Sends a DATA frame for a node: `values` by data-type name (or id). */
  sendData(id: string, values: Record<string, TelemetryValue>): void {
    this.mustBeOpen('sendData');
    const node = this.node(id);
    const table = this.dataTypes;
    if (!table) throw badConfig('sendData needs a dataTypes table (option dataTypes / --data-types)');
    const entries = Object.entries(values);
    if (entries.length === 0 || entries.length > 255) throw badConfig(`a DATA frame carries 1-255 values, got ${entries.length}`);
    const parts: Buffer[] = [Buffer.from([entries.length])];
    for (const [key, value] of entries) {
      const t = table.types().find((x) => x.name === key) ?? (/^\d+$/.test(key) ? table.get(Number(key)) : undefined);
      if (!t) throw badConfig(`no data type named ${JSON.stringify(key)} in the table (known: ${table.types().map((x) => x.name).join(', ')})`);
      let raw: Buffer;
      try {
        raw = table.encode(t.id, value);
      } catch (e) {
        throw badConfig(`value ${JSON.stringify(value)} does not fit ${t.name} (${t.encoding}): ${(e as Error).message}`);
      }
      parts.push(Buffer.from([t.id]), raw);
    }
    this.stats.dataFrames++;
    this.writeFrame(rootBody(node.addr, Op.DATA, Buffer.concat(parts)));
  }

  /** Writes bytes between frames (default: 16 random bytes that cannot start or end a frame). */
  injectNoise(bytes?: Buffer): void {
    this.mustBeOpen('injectNoise');
    const b = bytes ?? Buffer.from(Array.from({ length: 16 }, () => Math.floor(Math.random() * 0xfa)));
    this.out(b);
  }

  /** Frames and writes any body (e.g. an unknown opcode, a malformed NET_INFO). */
  injectFrame(body: Buffer): void {
    this.mustBeOpen('injectFrame');
    this.out(encodeFrame(body));
  }

  /** Writes bytes as they are (e.g. a frame cut short by a start byte). */
  writeRaw(bytes: Buffer): void {
    this.mustBeOpen('writeRaw');
    this.out(Buffer.from(bytes));
  }

  /** The simulated nodes, in the order they were added. */
  nodes(): NodeInfo[] {
    return [...this.byId.values()].map((n) => this.info(n));
  }

  /** One node's client (to drive it from a test or a script). */
  client(id: string): Client {
    return this.node(id).client;
  }

  // ---- record & replay ----------------------------------------------------------

  /**
   * Writes a recorded dump (see the header comment) to the port at the recorded
   * times divided by `speed`; resolves when the last chunk has been handed to the
   * port, or early (complete: false) if close() is called.
   */
  async replay(file: string, opts: ReplayOptions = {}): Promise<ReplayResult> {
    this.mustBeOpen('replay');
    const speed = opts.speed ?? 1;
    if (!(speed >= 0)) throw badConfig(`replay speed must be >= 0 (0 or Infinity = as fast as possible), got ${speed}`);
    const chunks = readDump(file);
    const fast = speed === 0 || speed === Infinity;
    const start = performance.now();
    let base = 0;
    let prev = 0;
    let bytes = 0;
    let sent = 0;
    this.log.info('replaying a mesh dump', { file, chunks: chunks.length, speed: fast ? 'max' : speed });
    for (const c of chunks) {
      if (this.closing) return { chunks: sent, bytes, complete: false };
      if (c.t < prev) base += prev - c.t; // a new session appended to the dump
      prev = c.t;
      if (!fast) {
        const wait = (c.t + base) / speed - (performance.now() - start);
        if (wait > 1) await this.pause(wait);
        if (this.closing) return { chunks: sent, bytes, complete: false };
      }
      const ok = this.out(c.data);
      sent++;
      bytes += c.data.length;
      if (!ok) await this.drained();
    }
    await this.flush();
    return { chunks: sent, bytes, complete: !this.closing };
  }

  // ---- shutdown -----------------------------------------------------------------

  /** Stops every node's client, clears every timer, closes the port (if it opened it) and the record file. */
  close(): Promise<void> {
    this.closedP ??= this.shutdown();
    return this.closedP;
  }

  private async shutdown(): Promise<void> {
    this.closing = true;
    this.stop.abort();
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
    for (const node of this.byId.values()) {
      this.untime(node);
      node.stop.abort();
      node.client.close();
    }
    const bound = new AbortController();
    await Promise.race([Promise.allSettled([...this.byId.values()].map((n) => n.task)), sleep(2000, bound.signal)]);
    bound.abort();
    const port = this.port;
    if (port) {
      port.off('data', this.onPortData);
      port.off('drain', this.onPortDrain);
      port.off('close', this.onPortClose);
      port.off('error', this.onPortError);
      port.on('error', () => {}); // late errors of a port being closed
      if (this.ownPort) await this.closePort();
    }
    if (this.recordFd !== null) {
      fs.closeSync(this.recordFd);
      this.recordFd = null;
    }
    this.log.info('mesh root emulator stopped', { commands: this.stats.commands, framesOut: this.stats.framesOut });
    this.emit('close');
  }

  private async closePort(): Promise<void> {
    const port = this.port as SerialPortType;
    if (!port.isOpen) return;
    await this.flush();
    await new Promise<void>((resolve) => port.close(() => resolve()));
  }

  // ---- internals ------------------------------------------------------------------

  /** Called by a node's link: the node wrote line-protocol bytes. */
  _lineFromNode(node: SimNode, data: Buffer): boolean {
    if (this.closing || !this.port) return true;
    this.stats.lineBytesUp += data.length;
    const room = this.maxFrame - 3;
    let ok = true;
    for (let at = 0; at < data.length; at += room) {
      ok = this.writeFrame(rootBody(node.addr, Op.LINE, data.subarray(at, at + room))) && ok;
    }
    return ok;
  }

  /** Called by a node's link when the node's own client ends it. */
  _nodeClosedLink(node: SimNode, link: NodeLink, reason: string): void {
    if (node.link !== link) return;
    node.link = null;
    if (this.closing || !node.announced || this.byId.get(node.id) !== node) return;
    this.log.info('node dropped its link: it leaves the mesh until it redials', { node: node.id, addr: hex4(node.addr), reason });
    this.nodeDown(node);
  }

  private async dial(node: SimNode): Promise<Link> {
    if (this.closing) throw new Error('mesh root emulator closed');
    if (node.left) throw new Error(`node ${node.id} is out of the mesh`);
    if (!node.announced) this.announce(node);
    node.link?.end('replaced by a new link');
    const link = new NodeLink(this, node);
    node.link = link;
    return link;
  }

  private announce(node: SimNode): void {
    node.announced = true;
    this.stats.nodeUps++;
    this.writeFrame(rootBody(node.addr, Op.NODE_UP, node.uuid));
    this.emit('node-up', node.id, node.addr);
  }

  private nodeDown(node: SimNode): void {
    node.announced = false;
    this.stats.nodeDowns++;
    this.writeFrame(rootBody(node.addr, Op.NODE_DOWN));
    this.emit('node-down', node.id, node.addr);
  }

  private onData(chunk: Buffer): void {
    this.stats.bytesIn += chunk.length;
    this.decoder.push(
      chunk,
      (body) => {
        this.stats.framesIn++;
        try {
          this.onCommand(body);
        } catch (e) {
          this.log.error('command handling failed', { error: (e as Error).stack ?? String(e) });
        }
      },
      (why) => {
        this.stats.framesDropped++;
        this.log.warn('dropped a frame from the server', { reason: why });
      },
    );
  }

  private onCommand(body: Buffer): void {
    if (this.closing) return;
    if (body.length < 7) {
      this.stats.badCommands++;
      this.result(false, `command frame of ${body.length} bytes is too short: it needs command(5) + addr(2)`);
      return;
    }
    const { cmd, addr, data } = parseCommandBody(body);
    this.stats.commands[cmd] = (this.stats.commands[cmd] ?? 0) + 1;
    this.emit('command', cmd, addr, data);
    if (this.silentSet.has(cmd)) {
      this.stats.silenced++;
      this.log.debug('command dropped without an answer (silentCommands)', { cmd, addr: hex4(addr) });
      return;
    }
    if (this.failSet.has(cmd)) {
      this.result(false, `${cmd} failed (the emulator is told to fail it)`);
      return;
    }
    switch (cmd) {
      case 'SEND-':
      case 'SENDI': {
        const node = this.byAddr.get(addr);
        if (!node) return this.result(false, `no node with address ${hex4(addr)} in the mesh`);
        if (node.left || !node.announced) return this.result(false, `node ${hex4(addr)} is not in the mesh now`);
        const delivered = this.toNode(node, data);
        if (!delivered && cmd === 'SENDI') return this.result(false, `node ${hex4(addr)} did not take the data (its link is down)`);
        return this.result(true);
      }
      case 'BCAST':
        for (const node of this.byId.values()) if (!node.left && node.announced) this.toNode(node, data);
        return this.result(true);
      case 'RST-R':
        this.result(true);
        this.rootReset();
        return;
      case 'CLEAN':
        return this.result(true);
      case 'NINFO':
        this.netInfo();
        return this.result(true);
      default:
        return this.result(
          false,
          `unknown command ${JSON.stringify(cmd)}: expected one of ${COMMANDS.join(' ')}`,
        );
    }
  }

  private toNode(node: SimNode, data: Buffer): boolean {
    if (data.length === 0) return true;
    const ok = node.link?.deliver(Buffer.from(data)) ?? false;
    if (ok) this.stats.lineBytesDown += data.length;
    else {
      this.stats.undelivered++;
      this.log.debug('data for a node without an open link dropped', { node: node.id, bytes: data.length });
    }
    return ok;
  }

  private netInfo(): void {
    let up = [...this.byId.values()].filter((n) => !n.left && n.announced);
    if (up.length > 255) {
      this.log.warn('NET_INFO lists at most 255 nodes (its count is one byte)', { nodes: up.length });
      up = up.slice(0, 255);
    }
    const data = Buffer.alloc(1 + 18 * up.length);
    data[0] = up.length;
    up.forEach((n, i) => {
      data.writeUInt16BE(n.addr, 1 + 18 * i);
      n.uuid.copy(data, 3 + 18 * i);
    });
    this.writeFrame(rootBody(0, Op.NET_INFO, data));
  }

  private result(ok: boolean, error = ''): void {
    if (ok) this.stats.resultsOk++;
    else {
      this.stats.resultsFailed++;
      this.log.info('command answered F', { error });
    }
    this.writeFrame(resultBody(ok, error));
  }

  private writeFrame(body: Buffer): boolean {
    if (body.length > this.maxFrame) {
      this.log.warn('frame body longer than maxFrame written anyway', { bytes: body.length, maxFrame: this.maxFrame });
    }
    this.stats.framesOut++;
    return this.out(encodeFrame(body));
  }

  /** Every byte to the port goes through here (and into the record file). */
  private out(chunk: Buffer): boolean {
    const port = this.port;
    if (!port || this.closing || port.destroyed) return true;
    this.stats.bytesOut += chunk.length;
    if (this.recordFd !== null) {
      const t = Math.round(performance.now() - this.t0);
      fs.writeSync(this.recordFd, JSON.stringify({ t, hex: chunk.toString('hex') }) + '\n');
    }
    return port.write(chunk);
  }

  private drained(): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        this.off('drain', done);
        this.stop.signal.removeEventListener('abort', done);
        resolve();
      };
      this.on('drain', done);
      this.stop.signal.addEventListener('abort', done, { once: true });
    });
  }

  /**
   * Resolves when what was written has left (serial port: handed to the OS and
   * drained), or after `limit` ms: a pty whose other end is gone must not hang us.
   */
  private flush(limit = 3000): Promise<void> {
    const port = this.port;
    if (!port || port.destroyed) return Promise.resolve();
    const sp = port as Partial<SerialPortType>;
    let done: Promise<void>;
    if (typeof sp.drain === 'function') {
      if (!sp.isOpen) return Promise.resolve();
      done = new Promise((resolve) => sp.drain!(() => resolve()));
    } else if (port.writableLength === 0) {
      return Promise.resolve();
    } else {
      done = new Promise((resolve) => port.once('drain', () => resolve()));
    }
    let timer: NodeJS.Timeout | undefined;
    return Promise.race([done, new Promise<void>((resolve) => (timer = setTimeout(resolve, limit)))]).finally(() => clearTimeout(timer));
  }

  private portLost(reason: string): void {
    if (this.closing) return;
    this.log.error('mesh root emulator lost its port; stopping', { reason });
    this.emit('lost', reason);
    void this.close();
  }

  private every(ms: number, fn: () => void): void {
    if (!(ms > 0)) return;
    const run = () => {
      this.timers.delete(t);
      if (this.closing) return;
      try {
        fn();
      } catch (e) {
        this.log.error('periodic task failed', { error: (e as Error).message });
      }
      this.every(ms, fn);
    };
    const t = setTimeout(run, ms);
    this.timers.add(t);
  }

  private pause(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        this.timers.delete(t);
        this.stop.signal.removeEventListener('abort', done);
        resolve();
      }, ms);
      const done = () => {
        clearTimeout(t);
        this.timers.delete(t);
        resolve();
      };
      this.timers.add(t);
      this.stop.signal.addEventListener('abort', done, { once: true });
    });
  }

  private periodicData(): void {
    const table = this.dataTypes;
    if (!table) return;
    const types = table.types().slice(0, 255);
    if (types.length === 0) return;
    for (const node of this.byId.values()) {
      if (node.left || !node.announced) continue;
      const uptime = Math.floor((Date.now() - node.joinedAt) / 1000);
      const values: Record<string, TelemetryValue> = {};
      for (const t of types) values[t.name] = plausibleValue(t, uptime);
      this.sendData(node.id, values);
    }
  }

  private churn(): void {
    const present = [...this.byId.values()].filter((n) => !n.left);
    if (present.length === 0) return;
    const node = pick(present);
    const downFor = this.opts.churnDownFor ?? Math.round(between(2000, 5000));
    this.log.info('churn: a node leaves the mesh for a while', { node: node.id, rejoinIn: downFor });
    this.nodeLeave(node.id);
    const t = setTimeout(() => {
      this.timers.delete(t);
      node.rejoinTimer = null;
      if (!this.closing && this.byId.get(node.id) === node) this.nodeJoin(node.id);
    }, downFor);
    this.timers.add(t);
    node.rejoinTimer = t;
  }

  private untime(node: SimNode): void {
    if (!node.rejoinTimer) return;
    clearTimeout(node.rejoinTimer);
    this.timers.delete(node.rejoinTimer);
    node.rejoinTimer = null;
  }

  private node(id: string): SimNode {
    const n = this.byId.get(id);
    if (!n) throw badConfig(`no node ${JSON.stringify(id)} (nodes: ${[...this.byId.keys()].join(', ') || 'none'})`);
    return n;
  }

  private info(n: SimNode): NodeInfo {
    return {
      id: n.id,
      addr: n.addr,
      uuid: n.uuid.toString('hex'),
      inMesh: !n.left,
      announced: n.announced,
      linked: n.link !== null && !n.link.isClosed,
      client: n.client,
    };
  }

  private mustBeOpen(what: string): void {
    if (!this.started) throw new TetherError('ERR_CLOSED', `mesh emulator: ${what}() before start(): call await emulator.start() first`);
    if (this.closing) throw new TetherError('ERR_CLOSED', `mesh emulator: ${what}() after close()`);
  }
}

/** One chunk of a recorded dump. */
export interface DumpChunk {
  t: number;
  data: Buffer;
}

/** Reads a dump written by the `record` option; errors name the file and line. */
export function readDump(file: string): DumpChunk[] {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw badConfig(`cannot read the mesh dump ${file} (${(e as Error).message})`);
  }
  const out: DumpChunk[] = [];
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i].trim();
    if (!line) continue;
    const where = `mesh dump ${file} line ${i + 1}`;
    let rec: { t?: unknown; hex?: unknown };
    try {
      rec = JSON.parse(line) as typeof rec;
    } catch {
      throw badConfig(`${where} is not JSON: expected {"t": ms, "hex": "…"}`);
    }
    if (typeof rec.t !== 'number' || !(rec.t >= 0)) throw badConfig(`${where}: "t" must be a number of ms >= 0`);
    if (typeof rec.hex !== 'string' || rec.hex.length % 2 !== 0 || !/^[0-9a-fA-F]*$/.test(rec.hex)) {
      throw badConfig(`${where}: "hex" must be an even number of hex digits`);
    }
    out.push({ t: rec.t, data: Buffer.from(rec.hex, 'hex') });
  }
  return out;
}
