/**
 * Node client ↔ server through a fault-injecting proxy: qos messages both ways
 * arrive exactly once and in order across abrupt cuts and silent blackholes.
 */
import test, { ExecutionContext } from 'ava';
import { Client, ClientOptions, Server, silentLogger } from '../src';
import { ChaosProxy } from '../src/chaos';
import { eventually } from './helpers/raw';

const TIMEOUT = 500;
const N = 1000;
/** A fault every this many messages received by the server. */
const FAULT_EVERY = 110;

/** A server, a fault proxy in front of it, and one client through the proxy, torn down after the test. */
async function rig(t: ExecutionContext, id: string, clientOpts: Partial<ClientOptions> = {}) {
  const server = await Server.listen({ host: '127.0.0.1', port: 0, timeout: TIMEOUT, settleDelay: 50, logger: silentLogger });
  const proxy = await ChaosProxy.start({ targetPort: server.port });
  const client = new Client({ id, port: proxy.port, timeout: TIMEOUT, reconnectDelay: 200, retryMin: 50, ...clientOpts });
  t.teardown(async () => {
    client.close();
    await proxy.close();
    await server.close();
  });
  await client.connect();
  return { server, proxy, client, conn: await server.clientConn(id) };
}

test('1,000 qos messages each way survive repeated cuts and blackholes, exactly once, in order', async (t) => {
  const { proxy, client, conn } = await rig(t, 'survivor');

  const atServer: number[] = [];
  const atClient: number[] = [];
  let faults = 0;
  const inject = () => {
    // Alternate: an abrupt cut, then a silent blackhole only keepalive timeouts can see.
    if (faults % 2 === 0) proxy.cut();
    else proxy.blackhole();
    faults++;
  };

  const serverReads = (async () => {
    while (atServer.length < N) {
      atServer.push(Number(await conn.readline()));
      if (atServer.length % FAULT_EVERY === 0) inject();
    }
  })();
  const clientReads = (async () => {
    while (atClient.length < N) atClient.push(Number(await client.readline()));
  })();
  const clientWrites = (async () => {
    for (let i = 0; i < N; i++) await client.write(String(i));
  })();
  const serverWrites = (async () => {
    for (let i = 0; i < N; i++) await conn.write(String(i));
  })();
  await Promise.all([serverReads, clientReads, clientWrites, serverWrites]);

  const expected = Array.from({ length: N }, (_, i) => i);
  t.deepEqual(atServer, expected, 'device → server: every message once, in order');
  t.deepEqual(atClient, expected, 'server → device: every message once, in order');
  t.true(faults >= 8, `faults injected: ${faults}`);
  await eventually(() => conn.counters.outages >= faults, 10 * TIMEOUT, 'every fault seen as an outage');
  t.log(
    `faults: ${proxy.injected.cut} cuts, ${proxy.injected.blackhole} blackholes; ` +
      `server: outages ${conn.counters.outages}, retransmits ${conn.counters.retransmits}, dupes dropped ${conn.counters.duplicatesDropped}; ` +
      `client: connects ${client.connects}, retransmits ${client.counters.retransmits}, dupes dropped ${client.counters.duplicatesDropped}`,
  );
});

test('qos with a window (wait: false) also arrives exactly once across outages', async (t) => {
  const { proxy, client, conn } = await rig(t, 'windowed', { window: 8 });
  const got: number[] = [];
  const reads = (async () => {
    while (got.length < 500) {
      got.push(Number(await conn.readline()));
      if (got.length % 100 === 0) proxy.cut();
    }
  })();
  const writes: Promise<void>[] = [];
  for (let i = 0; i < 500; i++) writes.push(client.write(String(i), { wait: false }));
  await Promise.all(writes);
  await reads;
  // Retransmissions of a window can overtake each other, so check the set, then count.
  t.deepEqual([...got].sort((a, b) => a - b), Array.from({ length: 500 }, (_, i) => i));
  t.is(new Set(got).size, 500, 'no duplicates');
  t.true(client.inFlight === 0);
  t.log(`cuts ${proxy.injected.cut}, client retransmits ${client.counters.retransmits}, server dupes dropped ${conn.counters.duplicatesDropped}`);
});
