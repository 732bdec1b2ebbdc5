/**
 * take() + commit(): a device line is marked consumed only when the app says
 * so (issue 14, item 11). A kill loop against a real `tether serve` with
 * persist: the device's qos lines all reach the app's record, none lost; a line
 * is recorded twice only if the server died between the app's record and its
 * commit (at most once per kill).
 */
import test from 'ava';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Client } from '../src';
import { freePort, serve } from './helpers/serve';
import { eventually } from './helpers/wait';

test('take/commit survives SIGKILLs: 0 lines lost, duplicates only for lines caught between record and commit', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-commit-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const record = path.join(dir, 'record.txt');
  const config = {
    port: await freePort(),
    http: null,
    timeout: 1000,
    settleDelay: 0,
    persist: path.join(dir, 'journal'),
    apps: [{ script: path.join(__dirname, 'fixtures', 'commit-app.ts'), clients: ['sensor'] }],
  };
  const env = { RECORD_FILE: record };
  let s = await serve(t, config, env);
  const dev = new Client({ id: 'sensor', port: config.port, timeout: 1000, reconnectDelay: 100, retryMin: 100, retryMax: 300 });
  t.teardown(() => dev.close());
  await dev.connect();
  const N = 1500;
  const writer = (async () => {
    for (let i = 0; i < N; i++) await dev.write(`line ${i}`);
  })();
  const KILLS = 12;
  for (let k = 0; k < KILLS; k++) {
    await new Promise((r) => setTimeout(r, 150 + ((k * 97) % 300)));
    s.proc.kill('SIGKILL');
    await s.exited;
    s = await serve(t, config, env);
  }
  await writer;
  const lines = () => (fs.existsSync(record) ? fs.readFileSync(record, 'utf8').split('\n').filter(Boolean) : []);
  await eventually(() => new Set(lines()).size === N, 30_000, 'every line recorded');
  const got = lines();
  const seen = new Map<string, number>();
  for (const l of got) seen.set(l, (seen.get(l) ?? 0) + 1);
  const dupes = [...seen.values()].filter((n) => n > 1).length;
  t.log(`${N} lines, ${KILLS} kills: ${got.length} records, ${dupes} recorded twice`);
  for (let i = 0; i < N; i++) if (!seen.has(`line ${i}`)) t.fail(`line ${i} was lost`);
  t.true(dupes <= KILLS, `${dupes} duplicates for ${KILLS} kills`);
  t.true(s.alive());
});
