/**
 * What `tether serve` tells its operator (issue 16 item 7), against real serve
 * processes: TLS without the optional `ca` starts, the dashboard's LAN addresses
 * are logged when it listens on every interface, and the pretty log never prints
 * a field without a value.
 */
import test from 'ava';
import * as fs from 'node:fs';
import { Client, silentLogger } from '../src';
import { lanAddresses } from '../src/init';
import { formatPretty } from '../src/log';
import { makePki } from './helpers/certs';
import { freePort, serve } from './helpers/serve';

test('TLS with key and cert but no ca (it is optional) starts, and a device connects over TLS', async (t) => {
  const pki = makePki();
  t.teardown(() => pki.remove());
  const s = await serve(t, { tls: { key: pki.serverKey, cert: pki.serverCert } });
  t.regex(s.output(), /listening host=127\.0\.0\.1 port=\d+ tls=true clientCerts=off/);
  const c = new Client({ id: 'tls-board', host: '127.0.0.1', port: s.port, timeout: 2000, tls: { ca: fs.readFileSync(pki.ca) }, logger: silentLogger });
  t.teardown(() => c.close());
  await c.connect();
  t.true(c.isUp);
  t.notRegex(s.output(), /ERROR|must be/);
});

test('an HTTP API on every interface logs its LAN addresses next to the local one', async (t) => {
  const httpPort = await freePort();
  const s = await serve(t, { http: { host: '0.0.0.0', port: httpPort, token: 'a-long-random-token-for-this-test' } });
  const line = s.output().split('\n').find((l) => l.includes('dashboard:')) ?? '';
  t.regex(line, new RegExp(`dashboard: http://127\\.0\\.0\\.1:${httpPort}/`));
  const lan = lanAddresses();
  for (const a of lan) t.true(line.includes(`http://${a.address}:${httpPort}/`), `names ${a.address}: ${line}`);
  if (lan.length === 0) t.notRegex(line, /lan=/);
  t.is((await s.api('/healthz')).status, 'ok', 'reached through 127.0.0.1 as logged');
});

test('the pretty log leaves out fields without a value', (t) => {
  const line = formatPretty({ time: 0, level: 'info', msg: 'device connected', id: 'lamp-1', type: undefined, remote: 'tcp:1.2.3.4:5' });
  t.is(line, '00:00:00.000 INFO  device connected id=lamp-1 remote=tcp:1.2.3.4:5');
});
