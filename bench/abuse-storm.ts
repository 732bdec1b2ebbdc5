/**
 * Abuse benchmark, attack kind "broadcast storm" (issue 14 item 5), run by
 * `npm run abuse -- --kinds broadcast-storm` (and by a plain `npm run abuse`
 * after the socket attacks).
 *
 * The server is a real `tether serve` process with its HTTP API, every limit at
 * its default, on a 512 MB heap (where the storm of the issue ran it out of
 * memory). `devicesDown` devices connect once and leave, so their Connections
 * exist and are down: a broadcast parks one write for each of them. Bystanders
 * (real `Client`s from 127.0.1.x) stay up and write one qos message per
 * `period` each; their ACK round trip and outages are measured in a quiet phase
 * and then during the storm: `broadcasts` small POST /api/broadcast (the API's
 * longest timeout, so every admitted one parks its writes for the whole run),
 * one after another from each of ten source addresses (the API takes 32
 * sockets per address), at most `rate` per second in all; an admitted one never
 * answers, so its sender moves on after a second. Bounded in count
 * (`broadcasts`) and time (`duration` per phase, and a hard 60 s past it for
 * the last answers); the server is stopped in `finally`.
 *
 * Goals: the server stays up (no OOM); broadcasts past the fleet's bound are
 * answered 503 with Retry-After; peak RSS during the storm within `rssBoundMB`
 * of the quiet phase; no bystander outage; bystander ACK p99 within `p99Ratio`
 * of the quiet phase; a fresh device connects afterwards.
 */
import { ChildProcess, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { performance } from 'node:perf_hooks';
import { setMaxListeners } from 'node:events';
import { Client, FLEET_DEFAULTS, silentLogger } from '../src';
import { TcpLink } from '../src/transports/tcp';

const ROOT = path.join(__dirname, '..');
const HOST = '127.0.0.1';

export interface StormOptions {
  /** Devices that connected once and are down (a broadcast parks a write for each). Default 2000. */
  devicesDown?: number;
  /** Bystander devices, up throughout. Default 200. */
  bystanders?: number;
  /** Broadcasts in the storm. Default 950 (the issue's). */
  broadcasts?: number;
  /** Most broadcasts fired per second, all senders together. Default 100. */
  rate?: number;
  /** Seconds per phase (quiet, storm). Default 15. */
  duration?: number;
  /** ms between one bystander's writes. Default 1000. */
  period?: number;
  /** Protocol timeout, ms. Default 2000. */
  timeout?: number;
  /** The server's V8 heap, MB (--max-old-space-size). Default 512. */
  heapMB?: number;
  /** Bound on (storm peak RSS − quiet peak RSS), MB. Default 300. */
  rssBoundMB?: number;
  /** Bound on bystander ACK p99 (storm) / p99 (quiet). Default 5. */
  p99Ratio?: number;
  /** The server's maxPendingSends (config key). Default: its default, 100000. */
  maxPendingSends?: number;
  /** More Node flags for the server process (e.g. `--max-semi-space-size=1`). */
  serverNodeArgs?: string[];
  log?: (line: string) => void;
}

export interface StormRtt {
  samples: number;
  p50: number;
  p99: number;
  max: number;
}

export interface StormPhase {
  name: string;
  /** qos writes by the bystanders, and how many were ACKed. */
  sent: number;
  acked: number;
  writeErrors: number;
  ackRtt: StormRtt;
  /** Outages the bystanders saw. */
  outages: number;
  /** Server resident memory, MB: at the start of the phase and its peak (sampled every 100 ms). */
  rssStartMB: number;
  rssPeakMB: number;
  /** The server's event-loop lag p99 over the phase (its /metrics), ms. */
  serverLagP99: number;
}

export interface StormReport {
  options: Required<Omit<StormOptions, 'log'>>;
  machine: { cpus: number; model?: string; memGiB: number; node: string };
  quiet: StormPhase;
  storm: StormPhase;
  requests: { fired: number; answered: Record<string, number>; admitted: number; socketErrors: number; firstRefusal: string | null; retryAfter: string | null };
  /** At most this many broadcasts fit the fleet's bound (maxPendingSends / devices). */
  admittedAtMost: number;
  server: { alive: boolean; exit: string | null; peakRssMB: number; tail: string };
  fresh: { ok: boolean; ms: number; error?: string };
  apiAfterMs: number;
  p99Ratio: number;
  rssGrowthMB: number;
  goals: Array<{ name: string; pass: boolean; detail: string }>;
  pass: boolean;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, Math.max(0, ms)));

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, HOST, () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

function rtt(xs: number[]): StormRtt {
  const s = [...xs].sort((a, b) => a - b);
  const at = (p: number) => (s.length ? s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] : NaN);
  return { samples: s.length, p50: at(50), p99: at(99), max: s.length ? s[s.length - 1] : NaN };
}

function rssMB(pid: number): { now: number; peak: number } {
  try {
    const st = fs.readFileSync(`/proc/${pid}/status`, 'latin1');
    const kb = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(st)?.[1] ?? NaN);
    return { now: kb('VmRSS') / 1024, peak: kb('VmHWM') / 1024 };
  } catch {
    return { now: NaN, peak: NaN };
  }
}

/** GET a path of the API; resolves with status and body text (bounded by `ms`). */
function get(port: number, p: string, ms = 10_000): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: HOST, port, path: p, agent: false, timeout: ms }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d) => (body += d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('timeout', () => req.destroy(new Error(`no answer to GET ${p} within ${ms} ms`)));
    req.on('error', reject);
  });
}

/** The server's event-loop lag p99 since the last scrape (prom-client resets it on each), ms. */
async function lagP99(port: number): Promise<number> {
  try {
    const { body } = await get(port, '/metrics');
    const m = /^nodejs_eventloop_lag_p99_seconds(?:\{[^}]*\})? ([0-9.e+-]+)/m.exec(body);
    return m ? Number(m[1]) * 1000 : NaN;
  } catch {
    return NaN;
  }
}

/** Devices that connect once and leave from `address`: their Connections stay, down. */
async function leaveBehind(port: number, ids: string[], address: (i: number) => string): Promise<void> {
  for (let i = 0; i < ids.length; i += 200) {
    await Promise.all(
      ids.slice(i, i + 200).map(
        (id, j) =>
          new Promise<void>((resolve) => {
            const s = net.connect({ host: HOST, port, localAddress: address(i + j) }, () => s.write(id + '\n'));
            s.once('data', () => s.destroy()); // greeted: attached
            s.once('close', () => resolve());
            s.on('error', () => {});
            s.setTimeout(10_000, () => s.destroy());
          }),
      ),
    );
  }
}

export async function runBroadcastStorm(opts: StormOptions = {}): Promise<StormReport> {
  const o: Required<Omit<StormOptions, 'log'>> = {
    devicesDown: opts.devicesDown ?? 2000,
    bystanders: opts.bystanders ?? 200,
    broadcasts: opts.broadcasts ?? 950,
    rate: opts.rate ?? 100,
    duration: opts.duration ?? 15,
    period: opts.period ?? 1000,
    timeout: opts.timeout ?? 2000,
    heapMB: opts.heapMB ?? 512,
    rssBoundMB: opts.rssBoundMB ?? 300,
    p99Ratio: opts.p99Ratio ?? 5,
    maxPendingSends: opts.maxPendingSends ?? FLEET_DEFAULTS.maxPendingSends,
    serverNodeArgs: opts.serverNodeArgs ?? [],
  };
  const log = opts.log ?? (() => {});
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-storm-'));
  const port = await freePort();
  const httpPort = await freePort();
  fs.writeFileSync(
    path.join(dir, 'tether.json'),
    JSON.stringify({ host: HOST, port, timeout: o.timeout, maxPendingSends: o.maxPendingSends, log: { level: 'info', format: 'pretty' }, http: { host: HOST, port: httpPort } }),
  );
  let tail = '';
  let exit: string | null = null;
  const proc: ChildProcess = spawn(process.execPath, [...o.serverNodeArgs, path.join(ROOT, 'bin', 'tether.js'), 'serve', '--config', path.join(dir, 'tether.json')], {
    cwd: ROOT,
    env: { ...process.env, NODE_OPTIONS: `--max-old-space-size=${o.heapMB}` },
  });
  const keep = (d: Buffer) => (tail = (tail + d.toString()).slice(-8000));
  proc.stdout!.on('data', keep);
  proc.stderr!.on('data', keep);
  const exited = new Promise<void>((r) =>
    proc.once('exit', (code, signal) => {
      exit = signal ? `signal ${signal}` : `code ${code}`;
      r();
    }),
  );
  const stop = new AbortController();
  setMaxListeners(0, stop.signal);
  const clients: Client[] = [];
  let sampler: NodeJS.Timeout | undefined;
  try {
    const up = Date.now() + 60_000;
    while (!tail.includes('dashboard:')) {
      if (exit || Date.now() > up) throw new Error(`tether serve did not start (${exit ?? 'no "dashboard:" line in 60 s'}):\n${tail}`);
      await sleep(50);
    }
    const pid = proc.pid!;
    log(`tether serve (pid ${pid}, --max-old-space-size=${o.heapMB}) on ${HOST}:${port}, API on ${httpPort}`);

    // Bystanders, up throughout, at most 200 per source address.
    for (let i = 0; i < o.bystanders; i++) {
      const address = `127.0.1.${1 + Math.floor(i / 200)}`;
      const c = new Client({
        id: `bystander-${i}`,
        host: HOST,
        port,
        timeout: o.timeout,
        logger: silentLogger,
        dial: () =>
          new Promise((resolve, reject) => {
            const s = net.connect({ host: HOST, port, localAddress: address });
            s.once('connect', () => {
              s.removeAllListeners('error');
              resolve(new TcpLink(s));
            });
            s.once('error', (e) => reject(e));
          }),
      });
      clients.push(c);
      void (async () => {
        for await (const _ of c);
      })().catch(() => {});
    }
    await Promise.all(clients.map((c) => c.connect()));
    const ids = Array.from({ length: o.devicesDown }, (_, i) => `gone-${i}`);
    await leaveBehind(port, ids, (i) => `127.0.7.${1 + (i % 200)}`);
    log(`${o.bystanders} bystanders up, ${o.devicesDown} devices connected once and left`);

    let peak = 0;
    sampler = setInterval(() => (peak = Math.max(peak, rssMB(pid).now)), 100);

    const phase = async (name: string, during?: () => Promise<void>): Promise<StormPhase> => {
      await lagP99(httpPort); // resets the server's lag histogram
      const rssStart = rssMB(pid).now;
      peak = rssStart;
      const outages0 = clients.reduce((n, c) => n + c.counters.outages, 0);
      const rtts: number[] = [];
      let sent = 0;
      let writeErrors = 0;
      const t0 = performance.now();
      const end = t0 + o.duration * 1000;
      const loops = clients.map(async (c, i) => {
        const offset = (i / clients.length) * o.period;
        for (let k = 0; ; k++) {
          const at = t0 + offset + k * o.period;
          if (at >= end || k > 100_000) break;
          await sleep(at - performance.now());
          sent++;
          const w0 = performance.now();
          try {
            await c.write(`${name} ${i} ${k}`, { signal: AbortSignal.timeout(60_000) });
            rtts.push(performance.now() - w0);
          } catch {
            writeErrors++;
          }
        }
      });
      await Promise.all([...loops, during?.() ?? Promise.resolve()]);
      return {
        name,
        sent,
        acked: rtts.length,
        writeErrors,
        ackRtt: rtt(rtts),
        outages: clients.reduce((n, c) => n + c.counters.outages, 0) - outages0,
        rssStartMB: rssStart,
        rssPeakMB: peak,
        serverLagP99: await lagP99(httpPort),
      };
    };

    log(`quiet phase: ${o.bystanders} bystanders × 1 qos write per ${o.period} ms for ${o.duration} s`);
    const quiet = await phase('quiet');
    log(`quiet: ACK p99 ${quiet.ackRtt.p99.toFixed(2)} ms, ${quiet.outages} outages, RSS peak ${quiet.rssPeakMB.toFixed(0)} MB`);

    const answered: Record<string, number> = {};
    let socketErrors = 0;
    let firstRefusal: string | null = null;
    let retryAfter: string | null = null;
    let fired = 0;
    const SENDERS = 10;
    const fire = (k: number): Promise<void> =>
      new Promise<void>((settled) => {
        fired++;
        const body = JSON.stringify({ line: `storm ${k}`, timeout: 600_000 });
        const req = http.request(
          { host: HOST, port: httpPort, path: '/api/broadcast', method: 'POST', localAddress: `127.0.10.${1 + (k % SENDERS)}`, agent: false, signal: stop.signal, headers: { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) } },
          (res) => {
            let text = '';
            res.setEncoding('utf8');
            res.on('data', (d) => (text += d));
            res.on('end', () => {
              const s = String(res.statusCode);
              answered[s] = (answered[s] ?? 0) + 1;
              if (res.statusCode === 503 && firstRefusal === null && /too many messages waiting/.test(text)) {
                firstRefusal = text;
                retryAfter = (res.headers['retry-after'] as string) ?? null;
              }
              settled();
            });
          },
        );
        req.on('error', () => {
          if (!stop.signal.aborted) socketErrors++;
          settled();
        });
        req.end(body);
      });
    const storm = async () => {
      const t0 = performance.now();
      await Promise.all(
        Array.from({ length: SENDERS }, async (_, a) => {
          for (let k = a; k < o.broadcasts && !exit; k += SENDERS) {
            await sleep(t0 + (k * 1000) / o.rate - performance.now());
            // An admitted broadcast answers when its devices have: never here. Move on after a second.
            await Promise.race([fire(k), sleep(1000)]);
          }
        }),
      );
    };
    log(`storm: ${o.broadcasts} broadcasts (at most ${o.rate}/s) to ${o.devicesDown + o.bystanders} devices, ${o.devicesDown} of them down; bystanders as before`);
    const stormPhase = await phase('storm', storm);
    const admittedAtMost = Math.floor(o.maxPendingSends / o.devicesDown);
    // The refusals come at once; bounded wait for the last of them.
    const answeredCount = () => Object.values(answered).reduce((a, b) => a + b, 0);
    const lastEnd = Date.now() + 60_000;
    while (!exit && answeredCount() + socketErrors < fired - admittedAtMost && Date.now() < lastEnd) await sleep(50);
    log(`storm: ACK p99 ${stormPhase.ackRtt.p99.toFixed(2)} ms, ${stormPhase.outages} outages, RSS peak ${stormPhase.rssPeakMB.toFixed(0)} MB; answers ${JSON.stringify(answered)}`);

    const fresh = { ok: false, ms: NaN, error: undefined as string | undefined };
    let apiAfterMs = NaN;
    if (!exit) {
      const f0 = performance.now();
      const c = new Client({ id: 'fresh-after-storm', host: HOST, port, timeout: o.timeout, logger: silentLogger });
      try {
        await c.connect();
        await c.write('hello after the storm', { signal: AbortSignal.timeout(30_000) });
        fresh.ok = true;
        fresh.ms = performance.now() - f0;
      } catch (e) {
        fresh.error = (e as Error).message;
      } finally {
        c.close();
      }
      const a0 = performance.now();
      if ((await get(httpPort, '/api/devices').catch(() => ({ status: 0 }))).status === 200) apiAfterMs = performance.now() - a0;
    }
    const alive = !exit;
    const server = { alive, exit, peakRssMB: rssMB(pid).peak, tail: alive ? '' : tail.slice(-2000) };
    const refused = answered['503'] ?? 0;
    const admitted = fired - answeredCount() - socketErrors;
    const p99Ratio = stormPhase.ackRtt.p99 / quiet.ackRtt.p99;
    const rssGrowthMB = stormPhase.rssPeakMB - quiet.rssPeakMB;
    const goals = [
      { name: 'server alive (no OOM)', pass: alive, detail: alive ? `up on a ${o.heapMB} MB heap` : `exited (${exit})` },
      {
        name: 'refused past the bound with 503',
        pass: refused >= fired - admittedAtMost && retryAfter !== null && /too many messages waiting for devices/.test(firstRefusal ?? ''),
        detail: `${admitted} admitted (at most ${admittedAtMost} fit maxPendingSends ${o.maxPendingSends}), ${refused} refused with 503 (Retry-After ${retryAfter}), other answers ${JSON.stringify(Object.fromEntries(Object.entries(answered).filter(([k]) => k !== '503')))}, ${socketErrors} socket errors`,
      },
      { name: `peak RSS growth ≤ ${o.rssBoundMB} MB`, pass: rssGrowthMB <= o.rssBoundMB, detail: `${quiet.rssPeakMB.toFixed(0)} → ${stormPhase.rssPeakMB.toFixed(0)} MB (+${rssGrowthMB.toFixed(0)} MB)` },
      { name: 'no bystander outage', pass: stormPhase.outages === 0 && quiet.outages === 0 && stormPhase.writeErrors === 0, detail: `${stormPhase.outages} outages, ${stormPhase.writeErrors} write errors during the storm` },
      { name: `bystander ACK p99 within ${o.p99Ratio}× quiet`, pass: p99Ratio <= o.p99Ratio, detail: `${stormPhase.ackRtt.p99.toFixed(2)} / ${quiet.ackRtt.p99.toFixed(2)} ms = ${p99Ratio.toFixed(2)}×` },
      { name: 'fresh device accepted after the storm', pass: fresh.ok, detail: fresh.ok ? `connected and ACKed in ${fresh.ms.toFixed(0)} ms; GET /api/devices in ${apiAfterMs.toFixed(0)} ms` : `failed: ${fresh.error ?? exit}` },
    ];
    return {
      options: o,
      machine: { cpus: os.cpus().length, model: os.cpus()[0]?.model, memGiB: Math.round(os.totalmem() / 2 ** 30), node: process.version },
      quiet,
      storm: stormPhase,
      requests: { fired, answered, admitted, socketErrors, firstRefusal, retryAfter },
      admittedAtMost,
      server,
      fresh,
      apiAfterMs,
      p99Ratio,
      rssGrowthMB,
      goals,
      pass: goals.every((g) => g.pass),
    };
  } finally {
    clearInterval(sampler);
    stop.abort();
    for (const c of clients) c.close();
    if (!exit) {
      proc.kill('SIGTERM');
      const t = setTimeout(() => proc.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(t);
    }
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** The storm's report as readable text. */
export function formatStorm(r: StormReport): string {
  const o = r.options;
  const f = (x: number, d = 2) => (Number.isFinite(x) ? x.toFixed(d) : '-');
  const rows = [r.quiet, r.storm].map(
    (p) =>
      `| ${p.name} | ${p.sent} | ${p.acked} | ${f(p.ackRtt.p50)} | ${f(p.ackRtt.p99)} | ${f(p.ackRtt.max, 1)} | ${p.outages} | ${f(p.serverLagP99, 1)} | ${f(p.rssStartMB, 0)} → ${f(p.rssPeakMB, 0)} |`,
  );
  const out = [
    `Broadcast storm: ${o.broadcasts} broadcasts (at most ${o.rate}/s, one at a time from each of 10 addresses; timeout 600 s each) to ${o.devicesDown} devices that are down and ${o.bystanders} bystanders, ${o.duration} s per phase, server heap ${o.heapMB} MB, maxPendingSends ${o.maxPendingSends}${o.serverNodeArgs.length ? `, ${o.serverNodeArgs.join(' ')}` : ''}`,
    `machine: ${r.machine.cpus} cores, ${r.machine.model}, ${r.machine.memGiB} GiB, Node ${r.machine.node}\n`,
    '| phase | bystander writes | ACKed | ACK p50 ms | p99 ms | max ms | outages | server lag p99 ms | server RSS MB (start → peak) |',
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- |',
    ...rows,
    `\nbroadcasts: ${r.requests.fired} fired, ${r.requests.admitted} admitted (waiting for devices), answers ${JSON.stringify(r.requests.answered)}, ${r.requests.socketErrors} socket errors; server peak RSS over its life ${f(r.server.peakRssMB, 0)} MB`,
    r.requests.firstRefusal ? `first 503: ${r.requests.firstRefusal}` : 'no 503',
    r.server.alive ? '' : `server died (${r.server.exit}):\n${r.server.tail}`,
    'Goals:',
    ...r.goals.map((g) => `  ${g.pass ? 'PASS' : 'FAIL'}  ${g.name}: ${g.detail}`),
    r.pass ? '\nall goals met' : '\nGOALS FAILED',
  ];
  return out.filter((l) => l !== '').join('\n');
}
