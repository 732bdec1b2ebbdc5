/**
 * Abuse benchmark child: the attacker. Keeps M hostile connections going, in
 * five kinds of about M/5 slots each, from their own loopback source addresses
 * (so the per-address limits and blocks of one kind do not decide another's fate,
 * and none of them touches the good clients' addresses):
 *
 * - slowloris  127.0.2.x   one byte of an ID line every few hundred ms, never a
 *                          newline (the server's idTimeout closes them)
 * - bigline    127.0.3.x   half send `junk-<slot>\n` then a 10 MB line without a
 *                          newline, in paced chunks (maxLineLength); half send
 *                          10 MB with no ID line at all (maxIdLength)
 * - binary     127.0.4.x   seeded PRNG bytes: half from the first byte (the ID
 *                          handshake), half after a plain `bin-<slot>\n` ID (the
 *                          line parser)
 * - rapid      127.0.5.x   connect, maybe a partial ID, destroy (FIN) or reset
 *                          (RST) at once, in a loop
 * - hijack     127.0.6.1 and 127.6.0.0/16   connect as a good client's ID with no
 *                          secret or a wrong one, while it is up and (when the
 *                          parent says so) while it is down; read everything the
 *                          server sends: a hijacker must receive nothing. A quarter
 *                          of the slots come from one address (blocked after
 *                          auth.maxFailures), the rest rotate over 4064 addresses
 *                          (a botnet: each address gets few tries, so most
 *                          attempts reach the secret check).
 *
 * Each slot re-opens its connection when it is closed, so the pressure stays up
 * for the whole phase. Every loop is bounded: it stops at `stop`, at its deadline,
 * and after a hard cap of iterations; every socket has a maximum life.
 *
 * Protocol (parent → child): { cmd: 'start', job } → { type: 'ramped' };
 * { cmd: 'down', ids } / { cmd: 'up', ids }; { cmd: 'stop' } → { type: 'stopped', stats };
 * { cmd: 'exit' }.
 */
import * as net from 'node:net';
import { WebSocket } from 'ws';
import { prng } from '../src/util';

export const KINDS = ['slowloris', 'bigline', 'binary', 'rapid', 'hijack'] as const;
/**
 * Kinds run only when named (`--kinds idcycle,stream`), one at a time, to measure
 * what each costs the bystanders:
 * - idcycle  127.0.7.x   a new made-up ID per connection, 64 lines of 60 KB that no
 *                        app reads (the server's app leaves `cycle-*` alone), then gone
 * - stream   127.0.8.x   connect as `stream-<slot>`: the server's app streams lines to
 *                        it without qos as fast as it reads; it reads in bursts
 * - wsflood  127.0.9.x   a WebSocket to the HTTP API's /ws that sends 20,000 filter
 *                        messages at once, then waits until the server drops it
 * - httpslow 127.0.10.x  a socket to the HTTP port that sends one byte of a request's
 *                        headers a second and never finishes them (HTTP slowloris)
 */
export const EXTRA_KINDS = ['idcycle', 'stream', 'wsflood', 'httpslow'] as const;
export const ALL_KINDS = [...KINDS, ...EXTRA_KINDS] as const;
export type Kind = (typeof ALL_KINDS)[number];

/** Pacing of each kind (ms unless noted). Scaled by `pace` (delays are multiplied by it). */
export interface Pacing {
  /** slowloris: ms between the bytes of the never-ending ID line. */
  slowByteMs: number;
  /** bigline: bytes per chunk of the 10 MB line, and ms between chunks on one connection. */
  bigChunk: number;
  bigChunkMs: number;
  /** bigline: the length of the line. */
  bigBytes: number;
  /** binary: bytes per chunk, ms between chunks, bytes before a connection is closed and re-opened. */
  binChunk: number;
  binChunkMs: number;
  binBytes: number;
  /** ms a slot waits after its connection closed before re-opening (every kind but rapid/hijack). */
  reopenMs: number;
  /** rapid: ms between connect/close cycles of one slot. */
  rapidMs: number;
  /** hijack: ms between attempts of one slot. */
  hijackMs: number;
}

export const DEFAULT_PACING: Pacing = {
  slowByteMs: 300,
  bigChunk: 64 * 1024,
  bigChunkMs: 50,
  bigBytes: 10 * 1024 * 1024,
  binChunk: 2048,
  binChunkMs: 100,
  binBytes: 256 * 1024,
  reopenMs: 200,
  rapidMs: 200,
  hijackMs: 200,
};

export interface HostileJob {
  host: string;
  port: number;
  /** The HTTP API's port (the wsflood and httpslow kinds). */
  httpPort?: number;
  /** Hostile connections kept going, split over the five kinds. */
  count: number;
  /** The good clients' IDs (the hijack targets). */
  goodIds: string[];
  /** Hard deadline for every loop, ms from start (the parent stops it earlier). */
  maxMs: number;
  seed: number;
  pacing: Pacing;
  /** Kinds to run (default all five); the connections are split over these. */
  kinds?: Kind[];
}

export interface KindStats {
  slots: number;
  /** Connections that reached `connect`. */
  opened: number;
  /** Closed before the connection was made (rapid closes some on purpose) or refused. */
  connectErrors: number;
  /** Closed by the server (not by us). */
  closedByServer: number;
  /** Closed by us (end of a cycle, end of a 10 MB line, rapid close, the end of the run). */
  closedByUs: number;
  bytesSent: number;
  bytesReceived: number;
  /** Still open when the loop ended. */
  openAtStop: number;
}

export interface HijackStats {
  attempts: number;
  /** Attempts made while their target was deliberately down. */
  whileDown: number;
  withSecret: number;
  plain: number;
  /** Bytes the server sent to hijackers (must be 0). */
  bytesReceived: number;
  /** What was received, if anything (first 200 bytes). */
  received: string;
  /** Attempts still open after 5 s (the server did not close them). */
  stayedOpen: number;
  /** Distinct source addresses used. */
  addresses: number;
}

export interface HostileStats {
  kinds: Record<Kind, KindStats>;
  hijack: HijackStats;
  iterations: number;
  capped: number;
  wallMs: number;
  cpuPct: number;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

let running = false;
let deadline = 0;
const open = new Set<net.Socket>();
const down = new Set<string>();
const zeroKind = (): KindStats => ({ slots: 0, opened: 0, connectErrors: 0, closedByServer: 0, closedByUs: 0, bytesSent: 0, bytesReceived: 0, openAtStop: 0 });
const stats: HostileStats = {
  kinds: Object.fromEntries(ALL_KINDS.map((k) => [k, zeroKind()])) as Record<Kind, KindStats>,
  hijack: { attempts: 0, whileDown: 0, withSecret: 0, plain: 0, bytesReceived: 0, received: '', stayedOpen: 0, addresses: 0 },
  iterations: 0,
  capped: 0,
  wallMs: 0,
  cpuPct: 0,
};
const hijackAddrs = new Set<string>();

/** Source addresses the rotating hijackers use (127.6.1.1 … 127.6.16.254). */
const HIJACK_POOL = 16 * 254;
/** Hard cap on the iterations of one slot, whatever the pacing. */
const MAX_ITERATIONS = 50_000;
/** Longest life of one hostile socket. */
const MAX_SOCKET_MS = 60_000;

interface Conn {
  socket: net.Socket;
  /** Resolves when the socket has closed. */
  closed: Promise<void>;
  /** True once we asked it to close. */
  ours: boolean;
  connected: boolean;
}

/** Opens one hostile socket from `localAddress` and does the bookkeeping of `kind`. */
function dial(job: HostileJob, kind: Kind, localAddress: string, onConnect: (c: Conn) => void): Conn {
  const st = stats.kinds[kind];
  const socket = net.connect({ host: job.host, port: job.port, localAddress });
  open.add(socket);
  const c: Conn = { socket, closed: null as unknown as Promise<void>, ours: false, connected: false };
  const life = setTimeout(() => close(c), MAX_SOCKET_MS);
  c.closed = new Promise<void>((resolve) =>
    socket.once('close', () => {
      clearTimeout(life);
      open.delete(socket);
      if (!c.connected) st.connectErrors++;
      else if (c.ours || !running) st.closedByUs++;
      else st.closedByServer++;
      resolve();
    }),
  );
  socket.on('error', () => {});
  socket.on('data', (d: Buffer) => {
    st.bytesReceived += d.length;
    if (kind === 'hijack') {
      stats.hijack.bytesReceived += d.length;
      if (stats.hijack.received.length < 200) stats.hijack.received += d.toString('latin1').slice(0, 200 - stats.hijack.received.length);
    }
  });
  socket.once('connect', () => {
    c.connected = true;
    st.opened++;
    if (!running) return close(c);
    onConnect(c);
  });
  return c;
}

function close(c: Conn, reset = false): void {
  if (c.socket.destroyed) return;
  c.ours = true;
  if (reset && c.connected) c.socket.resetAndDestroy();
  else c.socket.destroy();
}

function write(kind: Kind, c: Conn, data: Buffer | string): Promise<boolean> {
  if (c.socket.destroyed || !c.socket.writable) return Promise.resolve(false);
  const n = typeof data === 'string' ? Buffer.byteLength(data) : data.length;
  return new Promise((resolve) => {
    c.socket.write(data, (err) => {
      if (!err) stats.kinds[kind].bytesSent += n;
      resolve(!err);
    });
  });
}

const alive = (c: Conn) => running && !c.socket.destroyed && Date.now() < deadline;

/** Waits `ms`, or less if the socket closes or the run stops. */
async function pause(c: Conn, ms: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([c.closed, new Promise<void>((r) => (timer = setTimeout(r, ms)))]);
  clearTimeout(timer);
}

// ---- the five kinds: one connection's life each ------------------------------------------

async function slowloris(job: HostileJob, slot: number, iter: number, rnd: () => number): Promise<void> {
  const addr = `127.0.2.${1 + (slot % 8)}`;
  const c = dial(job, 'slowloris', addr, () => {});
  // Half spell a good client's ID (a slow hijack), half letters; never a newline.
  const text = slot % 2 === 0 ? `${job.goodIds[(slot + iter) % job.goodIds.length]}@` : 'slowloris-';
  await new Promise<void>((r) => (c.connected ? r() : c.socket.once('connect', () => r()).once('close', () => r())));
  for (let i = 0; alive(c) && i < 1000; i++) {
    const ch = i < text.length ? text[i] : String.fromCharCode(97 + Math.floor(rnd() * 26));
    await write('slowloris', c, ch);
    await pause(c, job.pacing.slowByteMs);
  }
  close(c);
  await c.closed;
}

async function bigline(job: HostileJob, slot: number, _iter: number, chunk: Buffer): Promise<void> {
  const addr = `127.0.3.${1 + (slot % 8)}`;
  const withId = slot % 2 === 0;
  const c = dial(job, 'bigline', addr, () => {});
  c.socket.resume(); // read (and drop) the server's keepalives
  await new Promise<void>((r) => (c.connected ? r() : c.socket.once('connect', () => r()).once('close', () => r())));
  if (withId && alive(c)) await write('bigline', c, `junk-${slot}\n`);
  for (let sent = 0; alive(c) && sent < job.pacing.bigBytes; sent += chunk.length) {
    const n = Math.min(chunk.length, job.pacing.bigBytes - sent);
    if (!(await write('bigline', c, n === chunk.length ? chunk : chunk.subarray(0, n)))) break;
    await pause(c, job.pacing.bigChunkMs);
  }
  close(c);
  await c.closed;
}

async function binary(job: HostileJob, slot: number, _iter: number, rnd: () => number): Promise<void> {
  const addr = `127.0.4.${1 + (slot % 8)}`;
  const afterId = slot % 2 === 0;
  const c = dial(job, 'binary', addr, () => {});
  c.socket.resume();
  await new Promise<void>((r) => (c.connected ? r() : c.socket.once('connect', () => r()).once('close', () => r())));
  if (afterId && alive(c)) await write('binary', c, `bin-${slot}\n`);
  const buf = Buffer.alloc(job.pacing.binChunk);
  for (let sent = 0; alive(c) && sent < job.pacing.binBytes; sent += buf.length) {
    for (let i = 0; i < buf.length; i++) buf[i] = Math.floor(rnd() * 256);
    if (!(await write('binary', c, Buffer.from(buf)))) break;
    await pause(c, job.pacing.binChunkMs);
  }
  close(c);
  await c.closed;
}

async function rapid(job: HostileJob, slot: number, iter: number, rnd: () => number): Promise<void> {
  const addr = `127.0.5.${1 + (slot % 32)}`;
  const mode = iter % 4;
  const c = dial(job, 'rapid', addr, (c) => {
    // 0: close at once; 1: a partial ID then close; 2: reset at once; 3: partial ID then reset.
    if (mode === 1 || mode === 3) c.socket.write(rnd() < 0.5 ? job.goodIds[Math.floor(rnd() * job.goodIds.length)] : 'rap');
    close(c, mode >= 2);
  });
  if (iter % 16 === 15) close(c); // now and then, before the connect completes
  await c.closed;
}

async function hijack(job: HostileJob, slot: number, iter: number, rnd: () => number): Promise<void> {
  const fixed = slot % 4 === 0;
  let addr = '127.0.6.1';
  if (!fixed) {
    const k = (slot * 7919 + iter) % HIJACK_POOL;
    addr = `127.6.${1 + Math.floor(k / 254)}.${1 + (k % 254)}`;
  }
  hijackAddrs.add(addr);
  const downIds = [...down];
  const targetDown = downIds.length > 0 && rnd() < 0.5;
  const target = targetDown ? downIds[Math.floor(rnd() * downIds.length)] : job.goodIds[Math.floor(rnd() * job.goodIds.length)];
  const style = iter % 3;
  // No secret, a wrong secret (well formed), a wrong secret with a declared type; then a message that an accepted link would ACK.
  const wrong = Buffer.from(Array.from({ length: 16 }, () => Math.floor(rnd() * 256))).toString('base64url');
  const idLine = style === 0 ? target : style === 1 ? `${target}@${wrong}` : `${target}@${wrong}##lamp##{"x":1}`;
  stats.hijack.attempts++;
  if (targetDown) stats.hijack.whileDown++;
  if (style === 0) stats.hijack.plain++;
  else stats.hijack.withSecret++;
  const c = dial(job, 'hijack', addr, (c) => {
    c.socket.write(`${idLine}\n00hijack\n01${'x'.repeat(32)}\n`);
  });
  const t = setTimeout(() => {
    stats.hijack.stayedOpen++;
    close(c);
  }, 5000);
  await c.closed;
  clearTimeout(t);
}

async function idcycle(job: HostileJob, slot: number, iter: number): Promise<void> {
  const addr = `127.0.7.${1 + (slot % 8)}`;
  const c = dial(job, 'idcycle', addr, () => {});
  c.socket.resume();
  await new Promise<void>((r) => (c.connected ? r() : c.socket.once('connect', () => r()).once('close', () => r())));
  const big = 'c'.repeat(60_000);
  let out = `cycle-${slot}-${iter}\n`;
  for (let n = 0; n < 64; n++) out += `${(n + 1).toString(16).padStart(2, '0')}${big}\n`;
  if (alive(c)) void write('idcycle', c, out);
  await pause(c, 1000); // what the server takes in a second; then gone
  close(c);
  await c.closed;
}

async function stream(job: HostileJob, slot: number): Promise<void> {
  const addr = `127.0.8.${1 + (slot % 8)}`;
  const c = dial(job, 'stream', addr, (c) => c.socket.write(`stream-${slot}\n`));
  // Read in bursts: 200 ms reading, 300 ms not, so the server's stream has to wait for room.
  const t = setInterval(() => {
    if (!c.socket.destroyed) c.socket.write('\n'); // a keepalive, as a device sends: the link stays up
    c.socket.resume();
    setTimeout(() => c.socket.pause(), 200);
  }, 500);
  for (let i = 0; alive(c) && i < 1000; i++) await pause(c, 1000);
  clearInterval(t);
  close(c);
  await c.closed;
}

/** WebSockets of the wsflood kind (closed at stop, like the sockets in `open`). */
const floods = new Set<WebSocket>();

async function wsflood(job: HostileJob, slot: number): Promise<void> {
  const st = stats.kinds.wsflood;
  const ws = new WebSocket(`ws://${job.host}:${job.httpPort}/ws`, { localAddress: `127.0.9.${1 + (slot % 32)}` });
  floods.add(ws);
  let ours = false;
  let opened = false;
  ws.on('error', () => {});
  ws.on('message', (d: Buffer) => (st.bytesReceived += d.length));
  const msgs = [JSON.stringify({ t: 'FILT', q: 'nothing-0' }), JSON.stringify({ t: 'FILT', q: 'nothing-1' })];
  ws.once('open', async () => {
    opened = true;
    st.opened++;
    // 20,000 messages as fast as this process can, 500 per turn of its event loop, until the server drops it.
    for (let i = 0; running && i < 20_000 && ws.readyState === WebSocket.OPEN; i++) {
      ws.send(msgs[i % 2]);
      st.bytesSent += msgs[i % 2].length;
      if (i % 500 === 499) await new Promise((r) => setImmediate(r));
    }
  });
  await new Promise<void>((resolve) => {
    // At most 30 s; the server is expected to drop it long before.
    const t = setTimeout(() => {
      ours = true;
      ws.terminate();
    }, 30_000);
    ws.once('close', () => {
      clearTimeout(t);
      floods.delete(ws);
      if (!opened) st.connectErrors++; // refused (503: maxBrowsers, 429: its address is over its share)
      else if (ours || !running) st.closedByUs++;
      else st.closedByServer++;
      resolve();
    });
  });
}

async function httpslow(job: HostileJob, slot: number): Promise<void> {
  const addr = `127.0.10.${1 + (slot % 64)}`;
  const c = dial({ ...job, port: job.httpPort ?? job.port }, 'httpslow', addr, () => {});
  c.socket.resume();
  await new Promise<void>((r) => (c.connected ? r() : c.socket.once('connect', () => r()).once('close', () => r())));
  const header = `GET /api/devices HTTP/1.1\r\nHost: ${job.host}\r\nX-Slow: `;
  for (let i = 0; alive(c) && i < 1000; i++) {
    await write('httpslow', c, i < header.length ? header[i] : 'x');
    await pause(c, 1000);
  }
  close(c);
  await c.closed;
}

// ---- the slots ---------------------------------------------------------------------------

async function slotLoop(job: HostileJob, kind: Kind, slot: number): Promise<void> {
  const rnd = prng(job.seed * 1000 + ALL_KINDS.indexOf(kind) * 100_003 + slot);
  const chunk = kind === 'bigline' ? Buffer.alloc(job.pacing.bigChunk, 'A') : Buffer.alloc(0);
  // Spread the first connections of each kind over the first second.
  await sleep(Math.floor(rnd() * 1000));
  let iter = 0;
  for (; running && Date.now() < deadline && iter < MAX_ITERATIONS; iter++) {
    stats.iterations++;
    try {
      if (kind === 'slowloris') await slowloris(job, slot, iter, rnd);
      else if (kind === 'bigline') await bigline(job, slot, iter, chunk);
      else if (kind === 'binary') await binary(job, slot, iter, rnd);
      else if (kind === 'rapid') await rapid(job, slot, iter, rnd);
      else if (kind === 'idcycle') await idcycle(job, slot, iter);
      else if (kind === 'stream') await stream(job, slot);
      else if (kind === 'wsflood') await wsflood(job, slot);
      else if (kind === 'httpslow') await httpslow(job, slot);
      else await hijack(job, slot, iter, rnd);
    } catch {
      // a hostile loop does not care why its socket failed
    }
    if (!running) break;
    const wait = kind === 'rapid' ? job.pacing.rapidMs : kind === 'hijack' ? job.pacing.hijackMs : job.pacing.reopenMs;
    await sleep(wait * (0.5 + rnd()));
  }
  if (iter >= MAX_ITERATIONS) stats.capped++;
}

let loops: Promise<void>[] = [];
let startedAt = 0;
let cpuAt = process.cpuUsage();

function startJob(job: HostileJob): void {
  running = true;
  startedAt = Date.now();
  cpuAt = process.cpuUsage();
  deadline = startedAt + job.maxMs;
  const kinds = job.kinds && job.kinds.length > 0 ? job.kinds : [...KINDS];
  const per = Math.floor(job.count / kinds.length);
  loops = [];
  kinds.forEach((kind, k) => {
    const n = k === kinds.length - 1 ? job.count - per * (kinds.length - 1) : per;
    stats.kinds[kind].slots = n;
    for (let slot = 0; slot < n; slot++) loops.push(slotLoop(job, kind, slot));
  });
  // The hard deadline ends everything even if the parent never says stop.
  setTimeout(() => void stopJob(), job.maxMs).unref();
}

async function stopJob(): Promise<HostileStats> {
  running = false;
  for (const s of open) {
    const st = stats.kinds[kindOf(s)];
    if (st) st.openAtStop++;
    s.destroy();
  }
  for (const ws of floods) {
    stats.kinds.wsflood.openAtStop++;
    ws.terminate();
  }
  await Promise.race([Promise.all(loops), sleep(10_000)]);
  stats.wallMs = Date.now() - startedAt;
  const cpu = process.cpuUsage(cpuAt);
  stats.cpuPct = ((cpu.user + cpu.system) / 1000 / Math.max(1, stats.wallMs)) * 100;
  stats.hijack.addresses = hijackAddrs.size;
  return stats;
}

function kindOf(s: net.Socket): Kind {
  const a = s.localAddress ?? '';
  if (a.startsWith('127.0.2.')) return 'slowloris';
  if (a.startsWith('127.0.3.')) return 'bigline';
  if (a.startsWith('127.0.4.')) return 'binary';
  if (a.startsWith('127.0.5.')) return 'rapid';
  if (a.startsWith('127.0.7.')) return 'idcycle';
  if (a.startsWith('127.0.8.')) return 'stream';
  if (a.startsWith('127.0.10.')) return 'httpslow';
  return 'hijack';
}

if (require.main === module) {
  process.on('disconnect', () => process.exit(0));
  process.on('message', (m: { cmd: string; job?: HostileJob; ids?: string[] }) => {
    if (m.cmd === 'start') {
      startJob(m.job!);
      // Every slot has started (or is about to within its first-second spread).
      void sleep(1000).then(() => process.send!({ type: 'ramped', open: open.size }));
    } else if (m.cmd === 'down') {
      for (const id of m.ids ?? []) down.add(id);
    } else if (m.cmd === 'up') {
      for (const id of m.ids ?? []) down.delete(id);
    } else if (m.cmd === 'stop') {
      void stopJob().then((s) => process.send!({ type: 'stopped', stats: s }));
    } else if (m.cmd === 'exit') {
      running = false;
      for (const s of open) s.destroy();
      for (const ws of floods) ws.terminate();
      process.exit(0);
    }
  });
  process.send!({ type: 'hello' });
}
