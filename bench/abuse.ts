/**
 * `npm run abuse [-- --quick] [--good N] [--hostile M] [--duration S] [--period MS]
 *   [--seed N] [--kinds slowloris,bigline,binary,rapid,hijack,broadcast-storm] [--pacing JSON]
 *   [--hostile-nice 0-19] [--server-node-args "--trace-gc …"] [--profile DIR] [--max-pending-sends N]`
 * Prints a report, writes bench/results/abuse.json, exits 1 if a goal fails.
 *
 * Abuse under load (issue 8, item 5). Three processes on loopback:
 * - the server under attack (`bench/abuse-server.ts`): a tether Server with auth
 *   on (`required: false`, the good IDs listed with sha256 hashes) and an echo app;
 * - the good clients, in this process: N real `Client`s with their secrets, from
 *   127.0.1.x, each writing one qos message per period and reading the echoes;
 * - the attacker (`bench/abuse-hostile.ts`): M hostile connections in five kinds
 *   (slowloris ID lines, 10 MB lines, random binary, rapid connect/close, ID hijack
 *   attempts) from other source addresses, in its own process so the attack does
 *   not share an event loop with the good clients' measurements.
 *
 * Phase 1 (quiet): the good traffic alone. Phase 2 (attack): the same good traffic
 * on the same server while the attacker keeps its M connections going; a few good
 * clients are deliberately disconnected for a few seconds so hijackers also try
 * their IDs while they are down. Then a fresh good client must still connect.
 *
 * Goals: every good client gets exactly its own messages back, each once, in order;
 * no hijack succeeds and hijackers receive no byte; ACK round trip p99 under attack
 * within 5× the quiet run's; server peak RSS under attack within a bound of the
 * quiet run's. `runAbuse()` is also used by test/abuse.test.ts. Every loop is
 * bounded in count and time; the children are killed in `finally`.
 */
import { ChildProcess, fork } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { monitorEventLoopDelay, performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { Client, generateSecret, hashSecret, silentLogger } from '../src';
import type { Link, LimitHits, HandshakeStats } from '../src';
import { TcpLink } from '../src/transports/tcp';
import { DEFAULT_PACING, HostileJob, HostileStats, Kind, KINDS, ALL_KINDS, Pacing } from './abuse-hostile';
import { formatStorm, runBroadcastStorm } from './abuse-storm';

/** `--kinds broadcast-storm`: the broadcast storm of bench/abuse-storm.ts (run by default after the socket attacks). */
const STORM_KIND = 'broadcast-storm';

const HERE = __dirname;
const TS = ['-r', 'ts-node/register/transpile-only'];
const HOST = '127.0.0.1';

export interface AbuseOptions {
  /** Good clients. Default 500. */
  good?: number;
  /** Hostile connections kept going during the attack. Default 1000. */
  hostile?: number;
  /** Seconds of good traffic per phase. Default 20. */
  duration?: number;
  /** ms between one good client's messages. Default 1000. */
  period?: number;
  /** Protocol timeout (server and clients; the server's idTimeout defaults to it). Default 2000. */
  timeout?: number;
  /** Good clients deliberately disconnected during the attack (hijack-while-down). Default 5. */
  downClients?: number;
  /** ms they stay down. Default 3000. */
  downFor?: number;
  /** Bound on (attack peak RSS − quiet peak RSS), MB. Default 300. */
  rssBoundMB?: number;
  /** Bound on p99(attack) / p99(quiet). Default 5. */
  p99Ratio?: number;
  seed?: number;
  /** Hostile pacing overrides. */
  pacing?: Partial<Pacing>;
  /** Hostile kinds to run (default all five; for finding what costs the server what). */
  kinds?: Kind[];
  /** Write the server's V8 CPU profile into this folder (summarise with bench/profile.ts). */
  profileDir?: string;
  /** More Node flags for the server process (e.g. `--trace-gc`). */
  serverNodeArgs?: string[];
  /**
   * Scheduling priority (nice, 0-19) of the attacker process. Default 0. With 19
   * the kernel runs the server and the good clients first whenever they are ready:
   * the attack still arrives, but its own CPU no longer delays them, as if the
   * attacker ran on other machines (it does not on this 2-core box).
   */
  hostileNice?: number;
  /** Progress lines (default: none). */
  log?: (line: string) => void;
}

export interface Rtt {
  samples: number;
  p50: number;
  p99: number;
  p999: number;
  max: number;
}

export interface ServerReport {
  phase: string;
  wallMs: number;
  cpuPct: number;
  lag: { p50: number; p99: number; max: number; mean: number };
  peaks: { rss: number; heapUsed: number; heapTotal: number; external: number; openConnections: number; pendingHandshakes: number; connections: number };
  memNow: { rss: number; heapUsed: number };
  /** Only in the final report: after a forced full GC (what is retained). */
  afterGc: { rss: number; heapUsed: number; external: number } | null;
  limits: LimitHits;
  handshakes: HandshakeStats;
  lines: { longLines: number; badLines: number; shed: number; messagesIn: number; outages: number; duplicatesDropped: number; retransmits: number };
  connections: number;
  goodConnectionsUp: number;
  openConnections: number;
  pendingHandshakes: number;
  blockedAddresses: number;
  hijacks: Array<{ id: string; address: string; remote: string; at: number }>;
  goodAttaches: number;
  otherAttaches: number;
  logTotal: number;
  logCounts: Record<string, number>;
}

export interface PhaseReport {
  name: string;
  wallMs: number;
  /** Messages written by all good clients, and echoes received. */
  sent: number;
  received: number;
  /** Per client: min and max messages sent (steady rate check). */
  sentPerClient: { min: number; max: number };
  /** Good clients whose echoes were not exactly their own messages, once each, in order. */
  clientsWrong: number;
  lost: number;
  duplicated: number;
  reordered: number;
  /** Lines that were not this client's own message. */
  foreign: number;
  writeErrors: number;
  /** Writes still unresolved when the phase had to end (must be 0). */
  stuckWrites: number;
  ackRtt: Rtt;
  /** Outages the good clients saw, not counting the deliberate ones. */
  outages: number;
  forcedDowns: number;
  /** This process (the good clients): event-loop lag and CPU. */
  clientLagP99: number;
  clientCpuPct: number;
  /** The whole machine's CPU use over the phase (from /proc/stat), % of all cores: busy (all but idle), of which softirq (the loopback network stack) and steal (the hypervisor). */
  machineCpu: { busy: number; softirq: number; steal: number };
  server: ServerReport;
  examples: string[];
}

export interface Goal {
  name: string;
  pass: boolean;
  detail: string;
}

export interface AbuseReport {
  options: Required<Omit<AbuseOptions, 'log' | 'pacing' | 'kinds' | 'profileDir' | 'serverNodeArgs' | 'hostileNice'> & { hostileNice: number }> & { pacing: Pacing; kinds: Kind[] };
  machine: { cpus: number; model?: string; memGiB: number; node: string };
  goodAddresses: string[];
  quiet: PhaseReport;
  attack: PhaseReport;
  hostile: HostileStats;
  /** Limit and handshake counters that moved during the attack (attack − quiet). */
  limitsDuringAttack: Partial<LimitHits>;
  handshakesDuringAttack: Partial<HandshakeStats>;
  linesDuringAttack: { longLines: number; badLines: number };
  p99Ratio: number;
  rssGrowthMB: number;
  hijacks: number;
  hijackBytes: number;
  fresh: { ok: boolean; ms: number; error?: string };
  /** The server at the very end, after a forced full GC: what the attack left behind. */
  final: ServerReport;
  serverCrash: string | null;
  goals: Goal[];
  pass: boolean;
}

type Msg = Record<string, any>;

/** A child process spoken to over IPC: wait for a message type, ask and wait. */
class Proc {
  private waiters: Array<{ type: string; resolve: (m: Msg) => void }> = [];
  readonly exited: Promise<void>;
  crash: string | null = null;
  constructor(
    readonly name: string,
    readonly child: ChildProcess,
  ) {
    child.on('message', (m: Msg) => {
      if (m.type === 'crash') this.crash = String(m.error);
      const i = this.waiters.findIndex((w) => w.type === m.type);
      if (i >= 0) this.waiters.splice(i, 1)[0].resolve(m);
    });
    this.exited = new Promise((r) => child.once('exit', () => r()));
  }
  wait(type: string, ms = 60_000): Promise<Msg> {
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`no ${type} from ${this.name} within ${ms} ms${this.crash ? ` (it crashed: ${this.crash})` : ''}`)), ms);
      const w = {
        type,
        resolve: (m: Msg) => {
          clearTimeout(t);
          resolve(m);
        },
      };
      this.waiters.push(w);
      void this.exited.then(() => {
        const i = this.waiters.indexOf(w);
        if (i < 0) return;
        this.waiters.splice(i, 1);
        clearTimeout(t);
        reject(new Error(`${this.name} exited while waiting for ${type}${this.crash ? `: ${this.crash}` : ''}`));
      });
    });
  }
  send(m: Msg): void {
    if (this.child.connected) this.child.send(m);
  }
  ask(m: Msg, type: string, ms?: number): Promise<Msg> {
    const p = this.wait(type, ms);
    this.send(m);
    return p;
  }
  /** Asks it to exit; kills it if it has not within 5 s. */
  async stop(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    this.send({ cmd: 'exit' });
    const t = setTimeout(() => this.child.kill('SIGKILL'), 5000);
    await this.exited;
    clearTimeout(t);
  }
}

function forkChild(name: string, file: string, execArgv: string[] = []): Proc {
  const child = fork(path.join(HERE, file), [], { execArgv: [...TS, ...execArgv], stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  return new Proc(name, child);
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, Math.max(0, ms)));

/** `p`'s value, or `onTimeout` after `ms` (the timer is cleared either way: nothing lingers). */
async function within<T, U>(p: Promise<T>, ms: number, onTimeout: () => U): Promise<T | U> {
  let timer: NodeJS.Timeout | undefined;
  try {
    const expiry = new Promise<U>((resolve, reject) => {
      timer = setTimeout(() => {
        try {
          resolve(onTimeout());
        } catch (e) {
          reject(e);
        }
      }, ms);
    });
    return await Promise.race([p, expiry]);
  } finally {
    clearTimeout(timer);
  }
}

/** Polls `cond` every `step` ms until it holds or `ms` passed; true if it held. */
async function until(cond: () => boolean, ms: number, step = 50): Promise<boolean> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) return false;
    await sleep(step);
  }
  return true;
}

export function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

function rttOf(xs: number[]): Rtt {
  const s = [...xs].sort((a, b) => a - b);
  return { samples: s.length, p50: percentile(s, 50), p99: percentile(s, 99), p999: percentile(s, 99.9), max: s.length ? s[s.length - 1] : NaN };
}

interface Ticks {
  busy: number;
  total: number;
  softirq: number;
  steal: number;
}

/** Jiffies of the machine (Linux /proc/stat), for the CPU use of a phase. */
function machineTicks(): Ticks | null {
  try {
    const f = fs.readFileSync('/proc/stat', 'latin1').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
    const idle = f[3] + (f[4] ?? 0);
    const total = f.slice(0, 8).reduce((a, b) => a + (b || 0), 0);
    return { busy: total - idle, total, softirq: f[6] ?? 0, steal: f[7] ?? 0 };
  } catch {
    return null;
  }
}

function machineUse(a: Ticks | null, b: Ticks | null): { busy: number; softirq: number; steal: number } {
  if (!a || !b) return { busy: NaN, softirq: NaN, steal: NaN };
  const t = Math.max(1, b.total - a.total);
  return { busy: ((b.busy - a.busy) / t) * 100, softirq: ((b.softirq - a.softirq) / t) * 100, steal: ((b.steal - a.steal) / t) * 100 };
}

/** One good client and what it sent and got back, per phase. */
interface Good {
  id: string;
  index: number;
  address: string;
  client: Client;
  sent: number[];
  recv: number[][];
  foreign: number;
  examples: string[];
  writeErrors: number;
  /** Set while the client is deliberately down: its sender waits on it. */
  gate: Promise<void> | null;
  /** The write in flight, if any (settles, never rejects). */
  busy: Promise<void>;
  forced: number;
  reader: Promise<void>;
}

/** Dials the server from a chosen loopback source address, as the Client's own dialer would. */
function dialFrom(port: number, localAddress: string, timeout: number): () => Promise<Link> {
  return () =>
    new Promise((resolve, reject) => {
      const socket = net.connect({ host: HOST, port, localAddress });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`connect timed out after ${timeout} ms`));
      }, timeout);
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.removeAllListeners('error');
        resolve(new TcpLink(socket));
      });
      socket.once('error', (err: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        socket.destroy();
        reject(new Error(err.code ?? err.message));
      });
    });
}

export async function runAbuse(opts: AbuseOptions = {}): Promise<AbuseReport> {
  const o = {
    good: opts.good ?? 500,
    hostile: opts.hostile ?? 1000,
    duration: opts.duration ?? 20,
    period: opts.period ?? 1000,
    timeout: opts.timeout ?? 2000,
    downClients: opts.downClients ?? 5,
    downFor: opts.downFor ?? 3000,
    rssBoundMB: opts.rssBoundMB ?? 300,
    p99Ratio: opts.p99Ratio ?? 5,
    seed: opts.seed ?? 1,
    pacing: { ...DEFAULT_PACING, ...opts.pacing },
    kinds: opts.kinds && opts.kinds.length > 0 ? opts.kinds : [...KINDS],
    hostileNice: opts.hostileNice ?? 0,
  };
  const log = opts.log ?? (() => {});
  const durMs = o.duration * 1000;
  // Good clients from a few addresses, at most 200 per address (the per-address default is 256).
  const nAddr = Math.max(5, Math.ceil(o.good / 200));
  const goodAddresses = Array.from({ length: nAddr }, (_, i) => `127.0.1.${i + 1}`);
  const ids = Array.from({ length: o.good }, (_, i) => `good-${i}`);
  const secrets = new Map(ids.map((id) => [id, generateSecret()]));
  const freshId = 'good-fresh';
  secrets.set(freshId, generateSecret());
  const devices = Object.fromEntries([...secrets].map(([id, s]) => [id, hashSecret(s)]));

  const prof = opts.profileDir ? ['--cpu-prof', `--cpu-prof-dir=${path.resolve(opts.profileDir)}`] : [];
  const server = forkChild('abuse-server', 'abuse-server.ts', ['--expose-gc', ...prof, ...(opts.serverNodeArgs ?? [])]);
  const hostile = forkChild('abuse-hostile', 'abuse-hostile.ts');
  if (o.hostileNice !== 0 && hostile.child.pid) os.setPriority(hostile.child.pid, o.hostileNice);
  const goods: Good[] = [];
  const lag = monitorEventLoopDelay({ resolution: 10 });
  try {
    await Promise.all([server.wait('hello'), hostile.wait('hello')]);
    const { port, httpPort } = await server.ask({ cmd: 'start', timeout: o.timeout, devices, goodAddrs: goodAddresses }, 'ready');
    log(`server on ${HOST}:${port}; ${o.good} good clients from ${goodAddresses[0]}…${goodAddresses[nAddr - 1]}`);

    // ---- connect the good clients ------------------------------------------------------
    const forcedIdx = new Set(Array.from({ length: Math.min(o.downClients, o.good) }, (_, i) => Math.floor((i * o.good) / Math.max(1, o.downClients))));
    for (let i = 0; i < o.good; i++) {
      const id = ids[i];
      const address = goodAddresses[i % nAddr];
      const client = new Client({
        id,
        secret: secrets.get(id),
        host: HOST,
        port,
        timeout: o.timeout,
        dial: dialFrom(port, address, o.timeout),
        retryMin: 200,
        retryMax: 2000,
        reconnectDelay: forcedIdx.has(i) ? o.downFor : undefined,
        logger: silentLogger,
      });
      const g: Good = { id, index: i, address, client, sent: [0, 0], recv: [[], []], foreign: 0, examples: [], writeErrors: 0, gate: null, busy: Promise.resolve(), forced: 0, reader: Promise.resolve() };
      g.reader = (async () => {
        for await (const line of client) {
          const s = line.trimEnd();
          const a = s.lastIndexOf(':');
          const b = s.lastIndexOf(':', a - 1);
          const phase = Number(s.slice(b + 1, a));
          const n = Number(s.slice(a + 1));
          if (s.slice(0, b) !== id || !(phase === 0 || phase === 1) || !Number.isInteger(n)) {
            g.foreign++;
            if (g.examples.length < 3) g.examples.push(s.slice(0, 80));
            continue;
          }
          g.recv[phase].push(n);
        }
      })().catch(() => {});
      goods.push(g);
    }
    for (let i = 0; i < goods.length; i += 100) {
      for (const g of goods.slice(i, i + 100)) void g.client.connect().catch(() => {});
      await sleep(50);
    }
    const allUp = await until(() => goods.every((g) => g.client.isUp), 60_000);
    if (!allUp) throw new Error(`only ${goods.filter((g) => g.client.isUp).length} of ${o.good} good clients came up within 60 s`);
    log(`${o.good} good clients up`);

    // ---- one phase of good traffic ----------------------------------------------------------
    const runPhase = async (phase: 0 | 1, name: string, during?: (t0: number, end: number) => Promise<void>): Promise<PhaseReport> => {
      await server.ask({ cmd: 'phase', name }, 'phased');
      const outages0 = goods.reduce((s, g) => s + g.client.counters.outages, 0);
      const forced0 = goods.reduce((s, g) => s + g.forced, 0);
      const rtts: number[] = [];
      lag.reset();
      lag.enable();
      const cpu0 = process.cpuUsage();
      const m0 = machineTicks();
      const wall0 = Date.now();
      const t0 = performance.now();
      const end = t0 + durMs;
      const maxMsgs = Math.ceil(durMs / o.period) + 1;
      const loops = goods.map(async (g) => {
        const offset = (g.index / o.good) * o.period; // staggered over the period
        for (let k = 0; k < maxMsgs; k++) {
          const at = t0 + offset + k * o.period;
          if (at >= end) break;
          await sleep(at - performance.now());
          while (g.gate) await g.gate;
          if (performance.now() >= end) break;
          const n = g.sent[phase]++;
          const w0 = performance.now();
          const p = g.client.write(`${g.id}:${phase}:${n}`);
          g.busy = p.then(
            () => {},
            () => {},
          );
          try {
            await p;
            rtts.push(performance.now() - w0);
          } catch {
            g.writeErrors++;
          }
        }
      });
      const extra = during ? during(t0, end) : Promise.resolve();
      // Bounded: the phase, then at most 60 s for the last writes (a write waits out outages).
      const done = await within(
        Promise.all([...loops, extra]).then(() => true),
        durMs + 60_000,
        () => false,
      );
      const stuckWrites = done ? 0 : goods.filter((g) => g.client.inFlight > 0 || g.client.queuedWrites > 0).length;
      // Every echo back (each is a qos write by the server app).
      await until(() => goods.every((g) => g.recv[phase].length >= g.sent[phase]), 30_000);
      const wallMs = Date.now() - wall0;
      const cpu = process.cpuUsage(cpu0);
      const m1 = machineTicks();
      lag.disable();
      const srv = (await server.ask({ cmd: 'report' }, 'report')) as unknown as ServerReport;
      let clientsWrong = 0;
      let lost = 0;
      let duplicated = 0;
      let reordered = 0;
      const examples: string[] = [];
      for (const g of goods) {
        const r = g.recv[phase];
        const s = g.sent[phase];
        const exact = r.length === s && r.every((n, i) => n === i);
        if (exact) continue;
        clientsWrong++;
        const uniq = new Set(r);
        for (let n = 0; n < s; n++) if (!uniq.has(n)) lost++;
        duplicated += r.length - uniq.size;
        for (let i = 1; i < r.length; i++) if (r[i] < r[i - 1]) reordered++;
        if (examples.length < 5) examples.push(`${g.id}: sent ${s}, received ${r.length} [${r.slice(0, 12).join(',')}${r.length > 12 ? ',…' : ''}]`);
      }
      const per = goods.map((g) => g.sent[phase]);
      return {
        name,
        wallMs,
        sent: per.reduce((a, b) => a + b, 0),
        received: goods.reduce((a, g) => a + g.recv[phase].length, 0),
        sentPerClient: { min: Math.min(...per), max: Math.max(...per) },
        clientsWrong,
        lost,
        duplicated,
        reordered,
        foreign: goods.reduce((a, g) => a + g.foreign, 0),
        writeErrors: goods.reduce((a, g) => a + g.writeErrors, 0),
        stuckWrites,
        ackRtt: rttOf(rtts),
        outages: goods.reduce((s, g) => s + g.client.counters.outages, 0) - outages0 - (goods.reduce((s, g) => s + g.forced, 0) - forced0),
        forcedDowns: goods.reduce((s, g) => s + g.forced, 0) - forced0,
        clientLagP99: Math.max(0, lag.percentile(99) / 1e6 - 10),
        clientCpuPct: ((cpu.user + cpu.system) / 1000 / wallMs) * 100,
        machineCpu: machineUse(m0, m1),
        server: srv,
        examples: [...examples, ...goods.flatMap((g) => g.examples)].slice(0, 8),
      };
    };

    // ---- phase 1: quiet ---------------------------------------------------------------------
    log(`quiet phase: ${o.good} clients × 1 message per ${o.period} ms for ${o.duration} s`);
    const quiet = await runPhase(0, 'quiet');
    log(`quiet: ${quiet.sent} sent, ${quiet.received} echoed, ACK p99 ${quiet.ackRtt.p99.toFixed(2)} ms`);

    // ---- phase 2: attack --------------------------------------------------------------------
    const job: HostileJob = {
      host: HOST,
      port,
      httpPort,
      count: o.hostile,
      goodIds: ids,
      maxMs: durMs + 90_000,
      seed: o.seed,
      pacing: o.pacing,
      kinds: o.kinds,
    };
    const ramped = await hostile.ask({ cmd: 'start', job }, 'ramped');
    log(`attack: ${o.hostile} hostile connections (${ramped.open} open after 1 s); good traffic again for ${o.duration} s`);
    let hostileStats: HostileStats | null = null;
    const downCycle = async (t0: number, end: number) => {
      // A few good clients go down for `downFor` ms a third into the phase; hijackers then try their IDs.
      await sleep(t0 + durMs * 0.3 - performance.now());
      const victims = goods.filter((g) => forcedIdx.has(g.index));
      if (victims.length === 0) return;
      const releases: Array<() => void> = [];
      for (const g of victims) g.gate = new Promise<void>((r) => releases.push(r));
      await Promise.all(victims.map((g) => g.busy));
      hostile.send({ cmd: 'down', ids: victims.map((g) => g.id) });
      for (const g of victims) {
        g.forced++;
        g.client.disconnect('abuse bench: deliberately down');
      }
      const back = Math.max(end - performance.now(), 0) + 60_000;
      await Promise.all(victims.map((g) => within(g.client.ready(), o.downFor + back, () => {}).catch(() => {})));
      hostile.send({ cmd: 'up', ids: victims.map((g) => g.id) });
      for (const g of victims) g.gate = null;
      for (const r of releases) r();
    };
    let attack: PhaseReport;
    try {
      attack = await runPhase(1, 'attack', downCycle);
    } finally {
      hostileStats = ((await hostile.ask({ cmd: 'stop' }, 'stopped', 30_000).catch(() => null)) as Msg | null)?.stats ?? null;
    }
    log(`attack: ${attack.sent} sent, ${attack.received} echoed, ACK p99 ${attack.ackRtt.p99.toFixed(2)} ms`);

    // ---- a fresh good client after the attack ------------------------------------------------
    const fresh = { ok: false, ms: NaN, error: undefined as string | undefined };
    {
      const f0 = performance.now();
      const c = new Client({ id: freshId, secret: secrets.get(freshId), host: HOST, port, timeout: o.timeout, dial: dialFrom(port, goodAddresses[0], o.timeout), retryMin: 200, retryMax: 1000, logger: silentLogger });
      try {
        const ok = await within(
          (async () => {
            await c.connect();
            await c.write('fresh after the attack');
            return (await c.readline()) === 'fresh after the attack\n';
          })(),
          30_000,
          () => {
            throw new Error('no echo within 30 s');
          },
        );
        fresh.ok = ok;
        fresh.ms = performance.now() - f0;
      } catch (e) {
        fresh.error = (e as Error).message;
      } finally {
        c.close();
      }
    }

    // Once the attacker's and the fresh client's sockets are gone (bounded wait), what is left.
    const settleEnd = Date.now() + 10_000;
    while (Date.now() < settleEnd) {
      const c = await server.ask({ cmd: 'count' }, 'count');
      if (c.openConnections <= o.good && c.pendingHandshakes === 0) break;
      await sleep(100);
    }
    const final = (await server.ask({ cmd: 'report', gc: true }, 'report')) as unknown as ServerReport;

    // ---- the verdict -----------------------------------------------------------------------------
    const q = quiet.server;
    const a = attack.server;
    const diff = <T extends Record<string, number>>(x: T, y: T): Partial<T> =>
      Object.fromEntries(Object.keys(x).map((k) => [k, x[k] - (y[k] ?? 0)]).filter(([, v]) => v !== 0)) as Partial<T>;
    const hijacks = a.hijacks.length;
    const hijackBytes = hostileStats?.hijack.bytesReceived ?? NaN;
    const p99Ratio = attack.ackRtt.p99 / quiet.ackRtt.p99;
    const rssGrowthMB = (a.peaks.rss - q.peaks.rss) / 2 ** 20;
    const exact = (p: PhaseReport) => p.clientsWrong === 0 && p.foreign === 0 && p.writeErrors === 0 && p.stuckWrites === 0 && p.sent > 0;
    const crash = server.crash;
    const goals: Goal[] = [
      {
        name: 'lose nothing',
        pass: exact(quiet) && exact(attack),
        detail: `every good client gets exactly its own messages back, once each, in order: quiet ${echoes(quiet)}; attack ${echoes(attack)}`,
      },
      { name: 'no hijack', pass: hijacks === 0 && hijackBytes === 0 && hostileStats !== null, detail: `${hijacks} hijacks, ${hijackBytes} bytes to hijackers in ${hostileStats?.hijack.attempts ?? '?'} attempts (${hostileStats?.hijack.whileDown ?? '?'} while the target was down)` },
      { name: `ACK p99 within ${o.p99Ratio}× quiet`, pass: p99Ratio <= o.p99Ratio, detail: `${attack.ackRtt.p99.toFixed(2)} / ${quiet.ackRtt.p99.toFixed(2)} ms = ${p99Ratio.toFixed(2)}×` },
      { name: `peak RSS growth ≤ ${o.rssBoundMB} MB`, pass: rssGrowthMB <= o.rssBoundMB, detail: `${mb(q.peaks.rss)} → ${mb(a.peaks.rss)} MB (+${rssGrowthMB.toFixed(0)} MB)` },
      { name: 'server alive, fresh client accepted', pass: !crash && fresh.ok, detail: crash ? `server crashed: ${crash}` : fresh.ok ? `connected and echoed in ${fresh.ms.toFixed(0)} ms` : `fresh client failed: ${fresh.error}` },
    ];
    return {
      options: o,
      machine: { cpus: os.cpus().length, model: os.cpus()[0]?.model, memGiB: Math.round(os.totalmem() / 2 ** 30), node: process.version },
      goodAddresses,
      quiet,
      attack,
      hostile: hostileStats ?? emptyHostile(),
      limitsDuringAttack: diff(a.limits, q.limits),
      handshakesDuringAttack: diff(a.handshakes as unknown as Record<string, number>, q.handshakes as unknown as Record<string, number>) as Partial<HandshakeStats>,
      linesDuringAttack: { longLines: a.lines.longLines - q.lines.longLines, badLines: a.lines.badLines - q.lines.badLines },
      p99Ratio,
      rssGrowthMB,
      hijacks,
      hijackBytes,
      fresh,
      final,
      serverCrash: crash,
      goals,
      pass: goals.every((g) => g.pass),
    };
  } finally {
    for (const g of goods) g.client.close();
    lag.disable();
    await Promise.all([hostile.stop(), server.stop()]);
  }
}

function emptyHostile(): HostileStats {
  const k = { slots: 0, opened: 0, connectErrors: 0, closedByServer: 0, closedByUs: 0, bytesSent: 0, bytesReceived: 0, openAtStop: 0 };
  return {
    kinds: Object.fromEntries(ALL_KINDS.map((n) => [n, { ...k }])) as HostileStats['kinds'],
    hijack: { attempts: 0, whileDown: 0, withSecret: 0, plain: 0, bytesReceived: NaN, received: '', stayedOpen: 0, addresses: 0 },
    iterations: 0,
    capped: 0,
    wallMs: 0,
    cpuPct: 0,
  };
}

const echoes = (p: PhaseReport) =>
  `${p.received}/${p.sent} echoed, ${p.clientsWrong} clients wrong (${p.lost} lost, ${p.duplicated} duplicated, ${p.reordered} reordered, ${p.foreign} foreign), ${p.writeErrors} write errors, ${p.stuckWrites} stuck`;
const mb = (b: number) => (b / 2 ** 20).toFixed(0);
const fix = (x: number, d = 2) => (Number.isFinite(x) ? x.toFixed(d) : '-');

function table(rows: Array<Record<string, string | number>>): string {
  if (rows.length === 0) return '';
  const head = Object.keys(rows[0]);
  const cells = [head, ...rows.map((r) => head.map((h) => String(r[h])))];
  const w = head.map((_, i) => Math.max(...cells.map((r) => r[i].length)));
  return cells.map((r, i) => '| ' + r.map((c, j) => c.padEnd(w[j])).join(' | ') + ' |' + (i === 0 ? '\n| ' + w.map((x) => '-'.repeat(x)).join(' | ') + ' |' : '')).join('\n');
}

/** The report as readable text (markdown tables). */
export function formatReport(r: AbuseReport): string {
  const o = r.options;
  const out: string[] = [];
  out.push(
    `Abuse under load: ${o.good} good clients (1 qos message / ${o.period} ms each, echoed), ${o.hostile} hostile connections, ${o.duration} s per phase, timeout ${o.timeout} ms`,
  );
  out.push(`machine: ${r.machine.cpus} cores, ${r.machine.model}, ${r.machine.memGiB} GiB, Node ${r.machine.node}\n`);
  const row = (p: PhaseReport) => ({
    phase: p.name,
    sent: p.sent,
    echoed: p.received,
    'per client': p.sentPerClient.min === p.sentPerClient.max ? String(p.sentPerClient.min) : `${p.sentPerClient.min}-${p.sentPerClient.max}`,
    'wrong clients': p.clientsWrong,
    'lost/dup/reord': `${p.lost}/${p.duplicated}/${p.reordered}`,
    'ACK p50 ms': fix(p.ackRtt.p50),
    'p99 ms': fix(p.ackRtt.p99),
    'p99.9 ms': fix(p.ackRtt.p999),
    'max ms': fix(p.ackRtt.max),
    outages: p.outages,
    'srv CPU %': fix(p.server.cpuPct, 0),
    'srv lag p99/max ms': `${fix(p.server.lag.p99, 1)}/${fix(p.server.lag.max, 0)}`,
    'clients CPU %': fix(p.clientCpuPct, 0),
    'clients lag p99 ms': fix(p.clientLagP99, 1),
    'machine CPU % (softirq, steal)': `${fix(p.machineCpu.busy, 0)} (${fix(p.machineCpu.softirq, 0)}, ${fix(p.machineCpu.steal, 0)})`,
    'peak RSS MB': mb(p.server.peaks.rss),
    'peak heap MB': mb(p.server.peaks.heapUsed),
  });
  out.push(table([row(r.quiet), row(r.attack)]));
  out.push(`\nACK p99 ratio attack/quiet: ${fix(r.p99Ratio)}×   peak RSS growth: ${r.rssGrowthMB.toFixed(0)} MB   server peaks under attack: ${r.attack.server.peaks.openConnections} sockets, ${r.attack.server.peaks.pendingHandshakes} handshaking, ${r.attack.server.peaks.connections} Connections`);
  const f = r.final;
  if (f.afterGc) {
    out.push(
      `After the attack, after a full GC: heap ${mb(f.afterGc.heapUsed)} MB (end of quiet phase, before any GC: ${mb(r.quiet.server.memNow.heapUsed)} MB), RSS ${mb(f.afterGc.rss)} MB, ${f.connections} Connections (${r.options.good + 1} good), ${f.openConnections} sockets open, ${f.pendingHandshakes} handshaking`,
    );
  }
  const h = r.hostile;
  const wall = Math.max(1, h.wallMs) / 1000;
  const opened = o.kinds.reduce((a, k) => a + h.kinds[k].opened, 0);
  const bytes = o.kinds.reduce((a, k) => a + h.kinds[k].bytesSent, 0);
  out.push(
    `\nHostile process (${(h.wallMs / 1000).toFixed(1)} s, CPU ${fix(h.cpuPct, 0)} %, nice ${o.hostileNice}): ${fix(opened / wall, 0)} connections/s, ${fix(bytes / 2 ** 20 / wall, 1)} MB/s of junk`,
  );
  out.push(
    table(
      o.kinds.map((k) => ({
        kind: k,
        slots: h.kinds[k].slots,
        opened: h.kinds[k].opened,
        'opened/s': fix(h.kinds[k].opened / wall, 0),
        'closed by server': h.kinds[k].closedByServer,
        'closed by us': h.kinds[k].closedByUs,
        'closed before connect': h.kinds[k].connectErrors,
        'MB sent': fix(h.kinds[k].bytesSent / 2 ** 20, 1),
        'bytes received': h.kinds[k].bytesReceived,
      })),
    ),
  );
  out.push(
    `hijack: ${h.hijack.attempts} attempts (${h.hijack.plain} no secret, ${h.hijack.withSecret} wrong secret; ${h.hijack.whileDown} while the target was deliberately down) from ${h.hijack.addresses} addresses; ` +
      `succeeded ${r.hijacks}, bytes received by hijackers ${r.hijackBytes}, left open by the server ${h.hijack.stayedOpen}`,
  );
  out.push(`\nServer limit counters during the attack: ${JSON.stringify(r.limitsDuringAttack)}`);
  out.push(`Handshake outcomes during the attack: ${JSON.stringify(r.handshakesDuringAttack)}`);
  out.push(`Lines dropped by Connections: longLines ${r.linesDuringAttack.longLines}, badLines ${r.linesDuringAttack.badLines}`);
  const logs = Object.entries(r.attack.server.logCounts)
    .sort((x, y) => y[1] - x[1])
    .slice(0, 8)
    .map(([k, v]) => `${v} × ${k}`);
  out.push(`Server log records during the attack: ${r.attack.server.logTotal} (${logs.join('; ')})`);
  if (r.quiet.examples.length || r.attack.examples.length) out.push(`Examples of wrong echoes: ${[...r.quiet.examples, ...r.attack.examples].join(' | ')}`);
  out.push('\nGoals:');
  for (const g of r.goals) out.push(`  ${g.pass ? 'PASS' : 'FAIL'}  ${g.name}: ${g.detail}`);
  out.push(r.pass ? '\nall goals met' : '\nGOALS FAILED');
  return out.join('\n');
}

// ---- CLI ---------------------------------------------------------------------------------

if (require.main === module) {
  const { values: args } = parseArgs({
    options: {
      quick: { type: 'boolean', default: false },
      good: { type: 'string' },
      hostile: { type: 'string' },
      duration: { type: 'string' },
      period: { type: 'string' },
      seed: { type: 'string' },
      pacing: { type: 'string' },
      kinds: { type: 'string' },
      profile: { type: 'string' },
      'server-node-args': { type: 'string' },
      'hostile-nice': { type: 'string' },
      'max-pending-sends': { type: 'string' },
    },
  });
  const num = (s: string | undefined, d: number) => (s === undefined ? d : Number(s));
  const quick = args.quick!;
  const opts: AbuseOptions = {
    good: num(args.good, quick ? 100 : 500),
    hostile: num(args.hostile, quick ? 200 : 1000),
    duration: num(args.duration, quick ? 5 : 20),
    period: num(args.period, 1000),
    seed: num(args.seed, 1),
    // --pacing '{"bigChunkMs":100}' overrides the hostile pacing (see DEFAULT_PACING in abuse-hostile.ts).
    pacing: args.pacing ? (JSON.parse(args.pacing) as Partial<Pacing>) : undefined,
    // --kinds rapid,hijack runs only those hostile kinds; --profile DIR writes the server's CPU profile.
    kinds: args.kinds ? (args.kinds.split(',').filter((k) => k !== STORM_KIND) as Kind[]) : undefined,
    profileDir: args.profile,
    serverNodeArgs: args['server-node-args']?.split(' ').filter(Boolean),
    hostileNice: num(args['hostile-nice'], 0),
    downFor: quick ? 2000 : 3000,
    log: (l) => console.log(`[${new Date().toISOString().slice(11, 19)}] ${l}`),
  };
  // Attack kind "broadcast storm" (bench/abuse-storm.ts): its own run against `tether serve` with the HTTP API.
  const storm = !args.kinds || args.kinds.split(',').includes(STORM_KIND);
  const sockets = !args.kinds || (opts.kinds ?? []).length > 0;
  void (async () => {
    let pass = true;
    fs.mkdirSync(path.join(HERE, 'results'), { recursive: true });
    if (sockets) {
      const r = await runAbuse(opts);
      console.log('\n' + formatReport(r));
      fs.writeFileSync(path.join(HERE, 'results', 'abuse.json'), JSON.stringify({ scenario: 'abuse', quick, at: new Date().toISOString(), report: r }, null, 2));
      pass &&= r.pass;
    }
    if (storm) {
      const r = await runBroadcastStorm({
        bystanders: quick ? 100 : 200,
        devicesDown: 2000,
        duration: num(args.duration, quick ? 5 : 15),
        // --max-pending-sends N: the server's fleet bound for the storm (config maxPendingSends).
        maxPendingSends: args['max-pending-sends'] ? Number(args['max-pending-sends']) : undefined,
        serverNodeArgs: opts.serverNodeArgs,
        log: opts.log,
      });
      console.log('\n' + formatStorm(r));
      fs.writeFileSync(path.join(HERE, 'results', 'abuse-storm.json'), JSON.stringify({ scenario: 'broadcast-storm', quick, at: new Date().toISOString(), report: r }, null, 2));
      pass &&= r.pass;
    }
    process.exit(pass ? 0 : 1);
  })().catch((e) => {
    console.error('abuse bench failed:', e);
    process.exit(2);
  });
}
