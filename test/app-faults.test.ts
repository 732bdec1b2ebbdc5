/**
 * Never down, never stuck (issue 13, items 1 and 2), against a real `tether
 * serve` process: an app's failure costs only that app instance, which comes
 * back; lines no app takes are accepted and shown; a device whose app stopped
 * reading is reported as stalled instead of hanging silently.
 */
import test from 'ava';
import * as path from 'node:path';
import { Client } from '../src';
import { launchChromium } from './helpers/browser';
import { PipelinePeer } from './helpers/pipeline-peer';
import { serve } from './helpers/serve';
import { eventually } from './helpers/wait';

const FAULTY = path.join(__dirname, 'fixtures', 'faulty-app.ts');

/** Reads lines from `c` until one satisfies `pred` (within `ms`). */
async function readUntil(c: Client, pred: (line: string) => boolean, ms = 20_000): Promise<string> {
  const deadline = AbortSignal.timeout(ms);
  for (;;) {
    const line = (await c.readline(deadline)).trimEnd();
    if (pred(line)) return line;
  }
}

test('an app failure of any kind costs that app instance only: logged, counted, restarted; the server and other devices carry on', async (t) => {
  const s = await serve(t, {
    apps: [{ script: FAULTY, clients: '*' }],
    appRestart: { initialDelay: 100, maxDelay: 400, resetAfter: 60_000 },
  });
  const client = (id: string) => {
    const c = new Client({ id, port: s.port });
    t.teardown(() => c.close());
    return c;
  };
  const victim = client('victim');
  await victim.connect();
  t.is(await readUntil(victim, (l) => l.startsWith('start')), 'start 1');

  // Bystanders keep talking to their own instances the whole time.
  const stop = new AbortController();
  const bystanders = ['b0', 'b1', 'b2', 'b3'].map(client);
  await Promise.all(bystanders.map((b) => b.connect()));
  const echoed = new Map<string, number>();
  const talk = bystanders.map(async (b) => {
    await readUntil(b, (l) => l === 'start 1');
    for (let k = 0; !stop.signal.aborted; k++) {
      await b.write(`ping-${k}`);
      await readUntil(b, (l) => l === `echo ping-${k}`);
      echoed.set(b.id, k + 1);
    }
  });

  const kinds = ['throw', 'json', 'reject', 'timer'];
  for (let i = 0; i < kinds.length; i++) {
    await victim.write(kinds[i]);
    t.is(await readUntil(victim, (l) => l.startsWith('start')), `start ${i + 2}`, `after "${kinds[i]}" the app came back`);
  }
  await victim.write('still there?');
  t.is(await readUntil(victim, (l) => l.startsWith('echo')), 'echo still there?');

  stop.abort();
  await Promise.all(talk);
  t.true(s.alive(), 'the server is still running');
  for (const b of bystanders) {
    t.is(b.counters.outages, 0, `${b.id} never lost its link`);
    t.true((echoed.get(b.id) ?? 0) > 0, `${b.id} was served throughout`);
  }
  const failures = s.output().match(/app failed.*client=victim/g) ?? [];
  t.is(failures.length, kinds.length, 'each failure logged once, with the client ID');
  t.regex(s.output(), /how="unhandled promise rejection"|how=unhandled promise rejection/);
  t.regex(s.output(), /uncaught exception/);
  const detail = await s.api('/api/devices/victim');
  t.like(detail.device.apps[0], { app: 'faulty-app', state: 'running', failures: kinds.length });
  t.regex(detail.device.apps[0].lastError, /SyntaxError|Error/);
  t.true(detail.device.stalled === false);
  const metrics: string = await s.api('/metrics');
  t.regex(metrics, new RegExp(`^tether_app_failures_total\\{app="faulty-app"\\} ${kinds.length}$`, 'm'));
  t.regex(metrics, /^tether_app_instances\{state="running"\} 5$/m);
  t.regex(metrics, /^tether_uncaught_errors_total 0$/m);
  t.like(await s.api('/healthz'), { status: 'ok', devicesUp: 5 });
});

test('lines no app takes are accepted (ACKed) and shown: boards of the original client never hang', async (t) => {
  const s = await serve(t, { apps: [] });
  // Stop-and-wait qos, as the original client writes: each line waits for its ACK.
  const peers = await Promise.all(
    Array.from({ length: 20 }, (_, i) => PipelinePeer.connect(s.port, `board-${i}`, { window: 1, timeout: 2000, count: 100 })),
  );
  t.teardown(() => peers.forEach((p) => p.close()));
  await Promise.all(peers.map((p) => p.finished));
  t.is(peers.reduce((a, p) => a + p.stats.retransmits, 0), 0);
  const detail = await s.api('/api/devices/board-7');
  t.is(detail.device.counters.messagesIn, 100);
  t.is(detail.device.buffered, 0, 'nothing piles up');
  t.true(detail.recent.some((r: { line: string }) => r.line.includes('board-7-99')), 'the last line is among the recent lines');
});

test('a device whose app stopped reading is reported stalled (log, API), not left hanging silently', async (t) => {
  const s = await serve(t, { apps: [{ script: FAULTY, clients: '*' }], rxBuffer: 8, stallAfter: 500 });
  const c = new Client({ id: 'sleepy', port: s.port });
  t.teardown(() => c.close());
  await c.connect();
  await readUntil(c, (l) => l === 'start 1');
  await c.write('hang');
  // The original client writes with qos and waits for each ACK: 8 buffered + 1 held, then no ACK.
  const writes: Promise<void>[] = [];
  for (let i = 0; i < 12; i++) writes.push(c.write(`reading ${i}`));
  writes.forEach((w) => w.catch(() => {}));
  await eventually(() => /stalled: nobody is reading.*client=sleepy/.test(s.output()), 20_000, 'a warning names the device');
  const detail = await s.api('/api/devices/sleepy');
  t.true(detail.device.stalled, 'the API says it is stalled');
  t.is(detail.device.buffered, 8);
  t.true(detail.device.held >= 1);
  t.is(detail.device.counters.stalls, 1);
  const metrics: string = await s.api('/metrics');
  t.regex(metrics, /^tether_devices_stalled 1$/m);
  t.regex(metrics, /^tether_device_rx_buffered\{id="sleepy",kind="buffered"\} 8$/m);
  t.true(s.alive());
});

test('the example apps skip a line they cannot parse: "temperature=21.5" does not stop json-exchange', async (t) => {
  const s = await serve(t, { apps: [{ script: path.join(__dirname, '..', 'examples', 'json-exchange.ts'), clients: '*' }] });
  const c = new Client({ id: '1', port: s.port });
  t.teardown(() => c.close());
  await c.connect();
  await c.write('temperature=21.5');
  await c.write('[1, 2, 3]');
  await eventually(() => /app got .*connects=1 count=2 uptime=3/.test(s.output()), 20_000, 'the next good line is handled');
  t.regex(s.output(), /skipped a line that is not JSON/);
  t.notRegex(s.output(), /app failed/);
  t.true(s.alive());
});

test('the dashboard shows a stalled device and a failing app in its row and its detail', async (t) => {
  const s = await serve(t, {
    apps: [{ script: FAULTY, clients: '*' }],
    rxBuffer: 4,
    stallAfter: 300,
    appRestart: { initialDelay: 600_000, maxDelay: 600_000, resetAfter: 60_000 },
  });
  const sleepy = new Client({ id: 'sleepy', port: s.port });
  const victim = new Client({ id: 'victim', port: s.port });
  t.teardown(() => sleepy.close());
  t.teardown(() => victim.close());
  await Promise.all([sleepy.connect(), victim.connect()]);
  await readUntil(sleepy, (l) => l === 'start 1');
  await readUntil(victim, (l) => l === 'start 1');
  await sleepy.write('hang');
  for (let i = 0; i < 8; i++) sleepy.write(`reading ${i}`).catch(() => {});
  await victim.write('throw');
  await eventually(async () => (await s.api('/api/devices/sleepy')).device.stalled === true, 30_000, 'the server reports sleepy stalled');
  await eventually(async () => (await s.api('/api/devices/victim')).device.apps[0]?.state === 'restarting', 30_000, "victim's app restarting");
  const browser = await launchChromium();
  t.teardown(() => browser.close());
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  await page.goto(`http://127.0.0.1:${s.httpPort}/`);
  await page.getByTestId('note-sleepy').filter({ hasText: 'stalled: nobody is reading' }).waitFor({ timeout: 30_000 });
  await page.getByTestId('note-victim').filter({ hasText: 'app faulty-app failed, restarting' }).waitFor({ timeout: 30_000 });
  t.is(await page.getByTestId('note-b-none').count(), 0);
  await page.getByTestId('row-victim').click();
  await page.getByText(/restarting, 1 failure, last: Error: the app threw on purpose/).waitFor({ timeout: 20_000 });
  t.pass();
});

test("a failed instance's leftover reader takes no line from its successor", async (t) => {
  const s = await serve(t, { apps: [{ script: path.join(__dirname, 'fixtures', 'zombie-app.ts'), clients: '*' }], appRestart: { initialDelay: 100, maxDelay: 100, resetAfter: 60_000 } });
  const c = new Client({ id: 'z', port: s.port });
  t.teardown(() => c.close());
  await c.connect();
  await eventually(() => /app started again/.test(s.output()), 20_000, 'the second instance runs');
  const replies: string[] = [];
  for (let i = 0; i < 20; i++) {
    await c.write(`L${i}`);
    replies.push((await c.readline(AbortSignal.timeout(10_000))).trimEnd());
  }
  t.deepEqual(replies, Array.from({ length: 20 }, (_, i) => `gen2:L${i}`));
});

test('appRestart.trace false: an error escaping app code is logged and counted, nothing restarts, the server carries on', async (t) => {
  const s = await serve(t, { apps: [{ script: FAULTY, clients: '*' }], appRestart: { initialDelay: 100, maxDelay: 100, resetAfter: 60_000, trace: false } });
  const c = new Client({ id: 'untraced', port: s.port });
  t.teardown(() => c.close());
  await c.connect();
  t.is(await readUntil(c, (l) => l.startsWith('start')), 'start 1');
  await c.write('reject');
  await eventually(() => /an error escaped outside any app instance/.test(s.output()), 20_000, 'logged');
  await c.write('still there?');
  t.is(await readUntil(c, (l) => l === 'echo still there?' || l.startsWith('start')), 'echo still there?', 'the same instance answers');
  const metrics: string = await s.api('/metrics');
  t.regex(metrics, /^tether_uncaught_errors_total 1$/m);
  t.true(s.alive());
});
