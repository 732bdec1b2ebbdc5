/**
 * `accepted: true` means delivered eventually (issue 14, item 9): the request's
 * timeout bounds only the wait to be queued, never the delivery, and with
 * persist the line survives a restart of the server.
 */
import test from 'ava';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Client } from '../src';
import { freePort, serve } from './helpers/serve';
import { eventually } from './helpers/wait';

test('an accepted line outlives its request timeout and a server restart, and arrives once', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-accepted-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const port = await freePort();
  const httpPort = await freePort();
  const config = { port, http: { host: '127.0.0.1', port: httpPort }, persist: dir };
  let s = await serve(t, config);
  const dev = new Client({ id: 'lamp', port, retryMin: 100, retryMax: 500 });
  await dev.connect();
  await eventually(async () => (await s.api('/api/devices/lamp')).device?.status === 'up', 10_000, 'the server knows the lamp');
  dev.close();
  await eventually(async () => (await s.api('/api/devices/lamp')).device?.status === 'down', 10_000, 'the lamp is gone');

  const r = await fetch(`http://127.0.0.1:${httpPort}/api/devices/lamp/messages`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ line: 'turn on', accepted: true, timeout: 300 }),
  });
  t.is(r.status, 200);
  t.like(await r.json(), { status: 'accepted' });
  await new Promise((res) => setTimeout(res, 1000)); // well past the request's timeout

  s.proc.kill('SIGTERM');
  await s.exited;
  s = await serve(t, config);
  const back = new Client({ id: 'lamp', port, retryMin: 100, retryMax: 500 });
  t.teardown(() => back.close());
  await back.connect();
  t.is(await back.readline(AbortSignal.timeout(15_000)), 'turn on\n', 'delivered after the restart');
  await new Promise((res) => setTimeout(res, 1000));
  t.is(back.buffered, 0, 'exactly once');
  t.true(s.alive());
});
