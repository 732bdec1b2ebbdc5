/**
 * Graceful shutdown (issue 16 item 3): a real `tether serve` with persist gets
 * SIGTERM while a device is connected and messages flow both ways. It exits 0
 * (past its 5 s bound it would exit 1), and after a restart on the same journal
 * every line the device had sent is there for the app, once and in order.
 */
import test from 'ava';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Client, silentLogger } from '../src';
import { sleep } from '../src/util';
import { freePort, serve } from './helpers/serve';
import { eventually, within } from './helpers/wait';

const T = 600;
const APP = path.join(__dirname, 'fixtures', 'shutdown-app.js');

test('SIGTERM mid-traffic: exit 0 within the bound, and the journal holds every unread line for the restart', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-shutdown-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const port = await freePort();
  const config = { port, timeout: T, persist: path.join(dir, 'journal'), apps: [{ script: APP, clients: ['dev'] }] };
  const first = await serve(t, config, { SHUTDOWN_PHASE: 'hold' });

  const dev = new Client({ id: 'dev', host: '127.0.0.1', port, timeout: T, logger: silentLogger });
  t.teardown(() => dev.close());
  await dev.connect();
  let heard = 0;
  void (async () => {
    for await (const _ of dev) heard++;
  })().catch(() => {});
  const acked: number[] = [];
  let stop = false;
  const writer = (async () => {
    for (let n = 0; !stop; n++) {
      await dev.write(`d-${n}`); // qos: resolves once the server ACKed it (journaled)
      acked.push(n);
      await sleep(30);
    }
  })();

  await eventually(() => acked.length >= 20 && heard >= 5, 30_000, 'lines both ways');
  first.proc.kill('SIGTERM');
  t.is(await within(first.exited, 20_000, 'the server to exit'), 0, first.output());
  const out = first.output();
  t.regex(out, /stopping why=SIGTERM/);
  t.regex(out, /server closed/);
  t.notRegex(out, /ERROR|exiting before the shutdown finished/, out);
  const before = acked.length;
  t.true(before >= 20);

  // Same port, same journal: the device comes back by itself and its writer carries on.
  const second = await serve(t, config, { SHUTDOWN_PHASE: 'read' });
  await eventually(() => acked.length >= before + 5, 30_000, 'the device to write to the restarted server');
  stop = true;
  await writer;
  const read = () => [...second.output().matchAll(/app read .*line=d-(\d+)/g)].map((m) => Number(m[1]));
  await eventually(() => read().length >= acked.length, 30_000, `the app to read all ${acked.length} lines`);
  t.deepEqual(read(), acked, 'every line ACKed before or after the SIGTERM, once, in order');
  second.proc.kill('SIGTERM');
  t.is(await within(second.exited, 20_000, 'the second server to exit'), 0);
});
