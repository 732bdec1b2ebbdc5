/**
 * Attacks from issue 14 against a real `tether serve` process (items 5 and 13's
 * HTTP side): each test performs the attack and asserts the promise: the server
 * stays up, its memory stays bounded, bystander devices keep their links, and
 * what is refused is refused with an answer that says what to do. Bounded in
 * count and time.
 */
import test from 'ava';
import { setMaxListeners } from 'node:events';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as net from 'node:net';
import { Client, silentLogger } from '../src';
import { serve } from './helpers/serve';
import { eventually, within } from './helpers/wait';

/** Peak and current resident memory of a process, MB (Linux /proc). */
function memoryOf(pid: number): { peakMB: number; nowMB: number } {
  const status = fs.readFileSync(`/proc/${pid}/status`, 'latin1');
  const kb = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? NaN);
  return { peakMB: kb('VmHWM') / 1024, nowMB: kb('VmRSS') / 1024 };
}

/** Devices that connected once and left: their Connections exist and are down. Raw sockets, `batch` at a time. */
async function leaveBehind(port: number, ids: string[], batch = 200): Promise<void> {
  for (let i = 0; i < ids.length; i += batch) {
    await Promise.all(
      ids.slice(i, i + batch).map(
        (id) =>
          new Promise<void>((resolve, reject) => {
            const s = net.connect({ host: '127.0.0.1', port }, () => s.write(id + '\n'));
            s.once('data', () => s.destroy()); // the greeting keepalive: the link was attached
            s.once('close', () => resolve());
            s.once('error', reject);
          }),
      ),
    );
  }
}

interface Answer {
  status: number;
  retryAfter: string | undefined;
  body: string;
}

/** POSTs JSON from a chosen loopback source address; resolves with the answer, or never if the server never answers (abort with `signal`). */
function post(port: number, path: string, body: unknown, localAddress: string, signal: AbortSignal): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const data = JSON.stringify(body);
    const req = http.request(
      { host: '127.0.0.1', port, path, method: 'POST', localAddress, agent: false, signal, headers: { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(data) } },
      (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (d) => (text += d));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, retryAfter: res.headers['retry-after'] as string | undefined, body: text }));
      },
    );
    req.on('error', reject);
    req.end(data);
  });
}

const pct = (xs: number[], p: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] : NaN;
};

test('broadcast storm: 950 broadcasts to 2,000 devices that are down, on a 512 MB heap: refused with 503 past the bound, no OOM, bystanders keep their links', async (t) => {
  const DOWN = 2000;
  const BYSTANDERS = 20;
  const STORM = 950;
  const MAX_PENDING_SENDS = 100_000; // the default
  const srv = await serve(t, { maxConnectionsPerAddress: 1000 }, { NODE_OPTIONS: '--max-old-space-size=512' });
  const pid = srv.proc.pid!;

  // Bystanders: real devices, up for the whole storm, writing qos messages and reading what comes.
  const rtts: number[] = [];
  const bystanders = Array.from({ length: BYSTANDERS }, (_, i) => {
    const c = new Client({ id: `bystander-${i}`, port: srv.port, timeout: 2000, logger: silentLogger });
    t.teardown(() => c.close());
    void (async () => {
      for await (const _ of c);
    })();
    return c;
  });
  await Promise.all(bystanders.map((c) => c.connect()));
  let talking = true;
  const writeErrors: string[] = [];
  const talk = Promise.all(
    bystanders.map(async (c, i) => {
      for (let k = 0; talking && k < 10_000; k++) {
        const t0 = performance.now();
        try {
          await c.write(`bystander ${i} says ${k}`);
        } catch (e) {
          writeErrors.push((e as Error).message);
          return;
        }
        rtts.push(performance.now() - t0);
        await new Promise((r) => setTimeout(r, 100));
      }
    }),
  );
  t.teardown(() => {
    talking = false;
  });

  const ids = Array.from({ length: DOWN }, (_, i) => `gone-${i}`);
  await leaveBehind(srv.port, ids);
  /** Devices the API lists (its `total` when it pages). */
  const count = (r: { devices?: unknown[]; total?: number }) => r.total ?? r.devices?.length;
  await eventually(async () => count(await srv.api('/api/devices?status=down')) === DOWN, 30_000, 'the devices to be down');
  const before = memoryOf(pid);

  // The storm: small broadcasts that park one write per device (timeout: the API's longest), one after
  // another from each of ten addresses (the HTTP API takes 32 sockets per address). An admitted
  // broadcast answers only when its devices have (never, here): its sender moves on after a second.
  const stop = new AbortController();
  setMaxListeners(0, stop.signal); // one signal for every request of the storm
  t.teardown(() => stop.abort());
  const answers: Answer[] = [];
  const errors: string[] = [];
  const ADDRESSES = 10;
  await Promise.all(
    Array.from({ length: ADDRESSES }, async (_, a) => {
      for (let k = a; k < STORM; k += ADDRESSES) {
        const answered = post(srv.httpPort, '/api/broadcast', { line: `storm ${k}`, timeout: 600_000 }, `127.0.10.${1 + a}`, stop.signal).then(
          (r) => void answers.push(r),
          (e: Error) => void (stop.signal.aborted || errors.push(e.message)),
        );
        await Promise.race([answered, new Promise((r) => setTimeout(r, 1000))]);
      }
    }),
  );
  // Devices = DOWN + BYSTANDERS: at most MAX_PENDING_SENDS / DOWN broadcasts fit; every other one must be refused.
  const admittedAtMost = Math.floor(MAX_PENDING_SENDS / DOWN);
  await eventually(() => answers.length + errors.length >= STORM - admittedAtMost, 60_000, 'the refusals');
  const busy = answers.filter((a) => a.status === 503 && /too many messages waiting for devices/.test(a.body));
  t.deepEqual(errors, [], 'no request failed at the socket');
  // Refused by the fleet's bound (503), or by the API's per-client load limit (429) if this machine is slow.
  t.deepEqual(answers.filter((a) => !busy.includes(a) && a.status !== 429), [], 'every answer is a refusal');
  t.true(busy.length > 0, 'the fleet bound refused broadcasts');
  for (const a of busy.slice(0, 5)) {
    t.is(a.retryAfter, '5');
    t.regex(JSON.parse(a.body).error, /too many messages waiting for devices, nothing was sent: \d+ sends are waiting for devices and this one needs \d+ more \(maxPendingSends 100000\)\. Retry once some are answered/);
  }

  // The promise: alive, bounded, and the fleet still served.
  t.true(srv.alive(), `the server is up:\n${srv.output().slice(-2000)}`);
  const after = memoryOf(pid);
  t.log(`server RSS ${before.nowMB.toFixed(0)} MB before the storm, peak ${after.peakMB.toFixed(0)} MB; ${STORM - answers.length} broadcasts admitted, ${busy.length} refused with 503, ${answers.length - busy.length} with 429`);
  t.true(after.peakMB < 700, `peak RSS ${after.peakMB.toFixed(0)} MB`);
  const list = await within(srv.api('/api/devices'), 10_000, 'GET /api/devices during the storm');
  t.is(count(list), DOWN + BYSTANDERS);
  const fresh = new Client({ id: 'fresh', port: srv.port, timeout: 2000, logger: silentLogger });
  t.teardown(() => fresh.close());
  await within(fresh.connect(), 20_000, 'a fresh device to connect');
  await within(fresh.write('hello after the storm'), 10_000, 'its write to be ACKed');

  talking = false;
  await within(talk, 20_000, 'the bystanders to finish');
  t.log(`bystanders: ${rtts.length} qos writes, ACK p50 ${pct(rtts, 50).toFixed(1)} ms, p99 ${pct(rtts, 99).toFixed(1)} ms, max ${pct(rtts, 100).toFixed(1)} ms`);
  t.deepEqual(writeErrors, []);
  t.is(bystanders.reduce((n, c) => n + c.counters.outages, 0), 0, 'no bystander lost its link');
  t.true(srv.alive());
});
