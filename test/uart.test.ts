/**
 * The UART transport against the mesh-root emulator, on the two ends of a real
 * pseudo-terminal pair made by socat. Mesh nodes run the full line protocol
 * (the same Client code as TCP devices) and become ordinary Connections.
 */
import test, { ExecutionContext } from 'ava';
import * as path from 'node:path';
import { Client, Connection, Fleet, HttpApi, Server, silentLogger, TetherError } from '../src';
import type { DeviceFn } from '../src/apps';
import { MeshRootEmulator, MeshRootEmulatorOptions } from '../src/emulator';
import { encodeFrame, Op, rootBody } from '../src/protocol/frames';
import { DataTypeTable } from '../src/telemetry';
import { MeshCommandError, MeshOptions, MeshTransport } from '../src/transports/uart';
import { PtyPair } from './helpers/pty-pair';
import { eventually } from './helpers/raw';
import { within } from './helpers/wait';

const T = 600;
const TABLE = DataTypeTable.load(path.join(__dirname, '..', 'examples', 'data-types.json'));

interface Rig {
  pty: PtyPair;
  server: Server;
  mesh: MeshTransport;
  emu: MeshRootEmulator;
}

async function rig(t: ExecutionContext, emuOpts: Partial<MeshRootEmulatorOptions> = {}, meshOpts: Partial<MeshOptions> = {}): Promise<Rig> {
  const pty = await PtyPair.open('uart');
  const server = new Server({ timeout: T, settleDelay: 20, logger: silentLogger });
  const mesh = new MeshTransport(server, { path: pty.a, baudRate: 921600, dataTypes: TABLE, commandTimeout: 250, ...meshOpts });
  await mesh.open();
  const emu = await MeshRootEmulator.open({ path: pty.b, baudRate: 921600, timeout: T, dataTypes: TABLE, ...emuOpts });
  t.teardown(async () => {
    await emu.close();
    await mesh.close();
    await server.close();
    await pty.close();
  });
  return { pty, server, mesh, emu };
}

/** A node that sends `n` numbered qos messages and records what it receives. */
function exchange(n: number, received: Map<string, number[]>): DeviceFn {
  return async (client: Client) => {
    const got: number[] = [];
    received.set(client.id, got);
    const reader = (async () => {
      while (got.length < n) got.push(Number(await client.readline()));
    })();
    for (let i = 0; i < n; i++) await client.write(String(i));
    await reader;
  };
}

/** The server side: every Connection sends `n` numbered qos messages and records what it receives. */
function serveExchange(server: Server, n: number, received: Map<string, number[]>): Promise<void>[] {
  const done: Promise<void>[] = [];
  server.on('connection', (conn: Connection) => {
    const got: number[] = [];
    received.set(conn.id, got);
    done.push(
      (async () => {
        const reader = (async () => {
          while (got.length < n) got.push(Number(await conn.readline()));
        })();
        for (let i = 0; i < n; i++) await conn.write(String(i));
        await reader;
      })(),
    );
  });
  return done;
}

const range = (n: number) => Array.from({ length: n }, (_, i) => i);

function allExactlyOnce(t: ExecutionContext, ids: string[], n: number, ...maps: Map<string, number[]>[]): void {
  for (const m of maps) for (const id of ids) t.deepEqual(m.get(id), range(n), `${id}: every message once, in order`);
}

test('20 mesh nodes exchange qos messages with the server exactly once; DATA joins their telemetry', async (t) => {
  const { server, mesh, emu } = await rig(t);
  const atServer = new Map<string, number[]>();
  const atNodes = new Map<string, number[]>();
  const N = 25;
  const serverDone = serveExchange(server, N, atServer);
  const ids = range(20).map((i) => `mesh-${i + 1}`);
  for (const id of ids) emu.addNode(id, exchange(N, atNodes));
  await eventually(() => serverDone.length === 20, 20_000, 'all 20 nodes connected');
  await Promise.all(serverDone);
  await eventually(() => ids.every((id) => atNodes.get(id)?.length === N), 20_000, 'nodes received everything');
  allExactlyOnce(t, ids, N, atServer, atNodes);
  for (const c of server.connections()) t.regex(c.remote ?? '', /^mesh:0x/, 'a mesh node is an ordinary Connection');

  emu.sendData('mesh-7', { temperature: -42, humidity: 55, status: 'ok' });
  const c7 = server.get('mesh-7')!;
  await eventually(() => c7.telemetry.latest('temperature') !== undefined, 5000, 'DATA decoded');
  t.is(c7.telemetry.latest('temperature')!.value, -42);
  t.is(c7.telemetry.latest('humidity')!.value, 55);
  t.is(c7.telemetry.latest('status')!.value, 'ok');
  t.log(`frames in ${mesh.stats.framesIn}, out ${mesh.stats.framesOut}; results ok ${mesh.stats.resultsOk}; framing ${JSON.stringify(mesh.framing)}`);
});

test('a node leaves and rejoins mid-traffic: its Connection has an outage and nothing is lost or doubled', async (t) => {
  const { server, emu } = await rig(t);
  const atServer = new Map<string, number[]>();
  const atNodes = new Map<string, number[]>();
  const N = 40;
  const serverDone = serveExchange(server, N, atServer);
  const ids = ['mesh-a', 'mesh-b', 'mesh-c'];
  for (const id of ids) emu.addNode(id, exchange(N, atNodes));
  const b = await server.clientConn('mesh-b');
  await eventually(() => (atServer.get('mesh-b')?.length ?? 0) >= 10, 20_000, 'traffic flowing');
  const down = new Promise<string>((r) => b.once('down', r));
  emu.nodeLeave('mesh-b');
  t.regex(await down, /node left the mesh/);
  await new Promise((r) => setTimeout(r, T));
  emu.nodeJoin('mesh-b');
  await Promise.all(serverDone);
  await eventually(() => ids.every((id) => atNodes.get(id)?.length === N), 20_000, 'nodes received everything');
  allExactlyOnce(t, ids, N, atServer, atNodes);
  t.true(b.counters.connects >= 2, 'the same Connection, reattached');
  t.is(server.get('mesh-a')!.counters.outages, 0, 'other nodes unaffected');
});

test('the root resets mid-traffic: every mesh link has an outage, then all traffic completes exactly once', async (t) => {
  const { server, mesh, emu } = await rig(t);
  const atServer = new Map<string, number[]>();
  const atNodes = new Map<string, number[]>();
  const N = 40;
  const serverDone = serveExchange(server, N, atServer);
  const ids = ['r1', 'r2', 'r3', 'r4'];
  for (const id of ids) emu.addNode(id, exchange(N, atNodes));
  await eventually(() => ids.every((id) => (atServer.get(id)?.length ?? 0) >= 10), 20_000, 'traffic flowing');
  emu.rootReset();
  await eventually(() => server.connections().every((c) => c.counters.outages >= 1), 10 * T, 'every link saw the reset');
  await Promise.all(serverDone);
  await eventually(() => ids.every((id) => atNodes.get(id)?.length === N), 30_000, 'nodes received everything');
  allExactlyOnce(t, ids, N, atServer, atNodes);
  t.log(`quarantined bytes ${mesh.stats.quarantinedBytes}; outages ${server.connections().map((c) => c.counters.outages).join(',')}`);
});

test('the root is unplugged (emulator and pty gone) and comes back: the port is reopened and the nodes return', async (t) => {
  const pty = await PtyPair.open('unplug');
  const base = pty.a.slice(0, -2);
  const server = new Server({ timeout: T, settleDelay: 20, logger: silentLogger });
  const mesh = new MeshTransport(server, { path: pty.a, baudRate: 921600, reopenMin: 100, reopenMax: 400 });
  await mesh.open();
  let emu = await MeshRootEmulator.open({ path: pty.b, baudRate: 921600, timeout: T });
  let pty2: PtyPair | null = null;
  t.teardown(async () => {
    await emu.close();
    await mesh.close();
    await server.close();
    await pty.close();
    await pty2?.close();
  });
  const echo: DeviceFn = async (client) => {
    for await (const line of client) await client.write('echo ' + line.trimEnd());
  };
  emu.addNode('plug-1', echo);
  emu.addNode('plug-2', echo);
  const [c1, c2] = await server.waitAll(['plug-1', 'plug-2']);
  await c1.write('before');
  t.is(await c1.readline(), 'echo before\n');

  await emu.close();
  await pty.close(); // the device disappears
  await eventually(() => mesh.stats.portLosses === 1 && !c1.isUp && !c2.isUp, 10_000, 'port loss seen, links down');
  pty2 = await PtyPair.open('unplug', base);
  emu = await MeshRootEmulator.open({ path: pty2.b, baudRate: 921600, timeout: T });
  emu.addNode('plug-1', echo);
  emu.addNode('plug-2', echo);
  await eventually(() => mesh.stats.opens === 2, 10_000, 'port reopened');
  // The Connections' pending writes wait out the outage and complete on the new links.
  await Promise.all([c1.write('after'), c2.write('after')]);
  t.is(await c1.readline(), 'echo after\n');
  t.is(await c2.readline(), 'echo after\n');
  t.is(server.get('plug-1'), c1, 'same Connection after the reopen');
});

test('corrupted bytes between and inside frames are dropped and counted; other nodes are unaffected', async (t) => {
  const { server, mesh, emu } = await rig(t);
  const atServer = new Map<string, number[]>();
  const atNodes = new Map<string, number[]>();
  const N = 30;
  const serverDone = serveExchange(server, N, atServer);
  const ids = ['n1', 'n2', 'n3', 'n4', 'n5'];
  for (const id of ids) emu.addNode(id, exchange(N, atNodes));
  await eventually(() => ids.every((id) => (atServer.get(id)?.length ?? 0) >= 5), 20_000, 'traffic flowing');
  emu.injectNoise(Buffer.from([0x00, 0x13, 0x37, 0xfe, 0xfa, 0x42])); // between frames
  emu.writeRaw(Buffer.from([0xff, 0x00, 0x01, 0x00, 0x61, 0x62])); // a frame cut short by the next start byte
  emu.injectFrame(Buffer.alloc(5000, 0x41)); // oversized
  emu.injectFrame(rootBody(0x0001, 0x77, Buffer.from('??'))); // unknown opcode
  emu.injectFrame(rootBody(0x0001, Op.NODE_UP, Buffer.from([1, 2, 3]))); // malformed body
  emu.writeRaw(Buffer.concat([encodeFrame(Buffer.from([0x00])), Buffer.from([0xff, 0xfa, 0xfe])])); // too short, bad escape
  await Promise.all(serverDone);
  await eventually(() => ids.every((id) => atNodes.get(id)?.length === N), 20_000, 'nodes received everything');
  allExactlyOnce(t, ids, N, atServer, atNodes);
  const f = mesh.framing;
  t.true(f.noiseBytes >= 6, `noise ${f.noiseBytes}`);
  t.true(f.restarted >= 1, 'cut-short frame counted');
  t.true(f.oversized >= 1, 'oversized frame counted');
  t.true(f.badEscape >= 1, 'bad escape counted');
  t.true(mesh.stats.unknownOpcodes >= 1);
  t.true(mesh.stats.badBodies >= 2, `bad bodies ${mesh.stats.badBodies}`);
  for (const id of ids) t.is(server.get(id)!.counters.outages, 0, `${id} had no outage`);
});

test('root commands: S resolves, F rejects with the root text, silence times out, and later commands still match', async (t) => {
  const { mesh, emu, server } = await rig(t, { failCommands: ['CLEAN'], silentCommands: ['RST-R'] });
  emu.addNode('x1');
  emu.addNode('x2');
  await server.waitAll(['x1', 'x2']);
  const failed = await t.throwsAsync(mesh.clean(), { instanceOf: MeshCommandError });
  t.truthy(failed?.rootMessage, 'the root said why');
  const silent = await t.throwsAsync(mesh.resetRoot(), { instanceOf: TetherError });
  t.is(silent?.code, 'ERR_MESH_TIMEOUT');
  t.regex(silent?.message ?? '', /did not answer RST-R within 250 ms/);
  const nodes = await mesh.netInfo();
  t.deepEqual(nodes.map((n) => n.addr).sort(), [1, 2]);
  await mesh.broadcast('\n');
  t.true(mesh.stats.resultsFailed >= 1);
  t.true(mesh.stats.resultsTimedOut >= 1);
});

// ---- lines longer than one frame (issue 14 item 13) -----------------------------------

/** A node that records every line it receives. */
function recorder(got: string[]): DeviceFn {
  return async (client: Client) => {
    for await (const line of client) got.push(line.trimEnd());
  };
}

test('a line too long for one mesh frame is refused up front (ERR_LINE_TOO_LONG, HTTP 413) with the limit in the message; the node is not wedged', async (t) => {
  const { server, mesh, emu } = await rig(t);
  const fleet = new Fleet(server);
  const api = new HttpApi({ server, fleet, host: '127.0.0.1', port: 0, logger: silentLogger });
  await api.listen();
  t.teardown(() => api.close());
  const got: string[] = [];
  emu.addNode('long-1', recorder(got));
  const conn = await server.clientConn('long-1');
  t.is(mesh.maxLineLength, 4088, 'maxFrame 4096 less the command, the address and the newline');

  const fits = 'a'.repeat(mesh.maxLineLength - 2); // with its 2-digit id: exactly one full frame
  t.deepEqual(await fleet.send('long-1', fits), { id: 'long-1', status: 'delivered' });
  const refused = await fleet.send('long-1', fits + 'b');
  t.is(refused.status, 'failed');
  t.is(refused.code, 'ERR_LINE_TOO_LONG');
  t.regex(
    refused.error!,
    /^line too long for this device's link \(mesh:0x0001\): 4089 bytes with its 2-digit id, the link carries at most 4088 in one frame\. Shorten it, or split it into lines of at most 4086 bytes/,
  );
  t.is((await fleet.send('long-1', '€'.repeat(1363))).status, 'failed', 'bytes count, not characters (1363 × 3 + 2 > 4088)');
  t.is((await fleet.sendAll(fits + 'b'))[0].code, 'ERR_LINE_TOO_LONG', 'a broadcast reports it per device');

  const post = (line: string) =>
    fetch(`http://127.0.0.1:${api.port}/api/devices/long-1/messages`, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ line }) });
  const r = await post(fits + 'b');
  t.is(r.status, 413);
  t.regex(((await r.json()) as { error: string }).error, /the link carries at most 4088 in one frame/);
  t.is((await post('over http')).status, 200);

  // Nothing oversized went out, nothing is stuck: the next line goes through at once.
  t.deepEqual(await within(fleet.send('long-1', 'after'), 10_000, 'a short line after the refusals'), { id: 'long-1', status: 'delivered' });
  await eventually(() => got.includes('after'), 5000, 'the node to get it');
  t.deepEqual(got, [fits, 'over http', 'after']);
  t.is(mesh.stats.oversizedOut, 0);
  t.is(emu.decoderStats.oversized, 0, 'the root never saw an oversized frame');
  t.is(conn.counters.retransmits, 0);
  t.is(conn.counters.outages, 0);
});

test('maxFrame is validated and sets the line limit of the node links', (t) => {
  const server = new Server({ timeout: T, logger: silentLogger });
  t.is(new MeshTransport(server, { path: '/dev/null', maxFrame: 1024 }).maxLineLength, 1016);
  t.throws(() => new MeshTransport(server, { path: '/dev/null', maxFrame: 8 }), { message: /"maxFrame" must be an integer from 16 to 1048576/ });
  t.throws(() => new MeshTransport(server, { path: '/dev/null', maxFrame: 4096.5 }), { message: /"maxFrame" must be an integer/ });
});

// The Endpoint applies the link's own line limit (one mesh frame) to write().
test('conn.write() itself refuses a line too long for a mesh frame, and the next write goes through', async (t) => {
  const { server, mesh, emu } = await rig(t);
  const got: string[] = [];
  emu.addNode('long-2', recorder(got));
  const conn = await server.clientConn('long-2');
  const tooLong = 'a'.repeat(mesh.maxLineLength - 1);
  const err = await t.throwsAsync(within(conn.write(tooLong), 3000, 'the oversized write to be refused'));
  t.is((err as TetherError).code, 'ERR_LINE_TOO_LONG');
  await within(conn.write('after'), 5000, 'the next write');
  t.deepEqual(got, ['after']);
  t.is(mesh.stats.oversizedOut, 0);
});
