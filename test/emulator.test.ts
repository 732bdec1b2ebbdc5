/**
 * The mesh-root emulator over a real pseudo-terminal pair (socat): the emulator
 * on one end, and on the other a raw SerialPort playing a minimal server that
 * decodes frames, answers ID lines with a keepalive, ACKs messages and keeps the
 * nodes' links alive. Every wait is for an event, bounded by a generous limit.
 */
import test, { ExecutionContext } from 'ava';
import { execFile, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Duplex } from 'node:stream';
import { SerialPort } from 'serialport';
import { MeshRootEmulator, MeshRootEmulatorOptions, readDump } from '../src/emulator';
import { commandBody, encodeFrame, FrameDecoder, Op, parseRootBody, RootMessage, rootBody } from '../src/protocol/frames';
import { silentLogger } from '../src/log';
import { Server } from '../src/server';
import { DataTypeTable } from '../src/telemetry';
import { MeshTransport } from '../src/transports/uart';
import { PtyPair } from './helpers/pty-pair';

const ROOT = path.join(__dirname, '..');
const BIN = path.join(ROOT, 'bin', 'tether.js');
const TABLE = DataTypeTable.load(path.join(ROOT, 'examples', 'data-types.json'));
const TIMEOUT = 1000; // line-protocol timeout of the simulated nodes and of this peer

type Msg = RootMessage & { at: number };
type Line = { addr: number; kind: 'id' | 'ka' | 'ack' | 'msg'; text: string; mid?: string };

/** The test's side of the serial link: a minimal server. */
class MeshPeer {
  readonly frames: Msg[] = [];
  readonly lines: Line[] = [];
  readonly raw: Buffer[] = [];
  rawBytes = 0;
  readonly decoder = new FrameDecoder(4096);
  /** Answer ID lines and messages, keep live nodes' links up with keepalives. */
  auto = true;
  commandsSent = 0;
  resultsReceived = 0;
  unexpectedResults = 0;
  private readonly waiting: Array<{ cmd: string; resolve: (m: Msg) => void }> = [];
  private readonly streams = new Map<number, { buf: string; expectId: boolean; live: boolean }>();
  private readonly waiters = new Set<() => void>();
  private kaTimer: NodeJS.Timeout;

  private constructor(readonly port: SerialPort) {
    port.on('data', (chunk: Buffer) => this.onData(chunk));
    port.on('error', () => {});
    this.kaTimer = setInterval(() => {
      if (!this.auto) return;
      for (const [addr, s] of this.streams) if (s.live && !s.expectId) void this.send('SEND-', addr, '\n');
    }, TIMEOUT / 4);
  }

  static async open(file: string): Promise<MeshPeer> {
    const port = new SerialPort({ path: file, baudRate: 115200, autoOpen: false });
    await new Promise<void>((resolve, reject) => port.open((e) => (e ? reject(e) : resolve())));
    return new MeshPeer(port);
  }

  /** Sends a command frame; resolves with its RESULT (never, if `answered` is false). */
  send(cmd: string, addr: number, data: string | Buffer = Buffer.alloc(0), answered = true): Promise<Msg> {
    return this.sendBody(commandBody(cmd as 'SEND-', addr, typeof data === 'string' ? Buffer.from(data) : data), cmd, answered);
  }

  sendBody(body: Buffer, what: string, answered = true): Promise<Msg> {
    this.commandsSent++;
    const p = new Promise<Msg>((resolve) => {
      if (answered) this.waiting.push({ cmd: what, resolve });
    });
    this.port.write(encodeFrame(body));
    return p;
  }

  /** Resolves with the first frame (from `from` on) that matches, or rejects after `ms`. */
  waitFrame(what: string, pred: (m: Msg) => boolean, from = 0, ms = 15000): Promise<Msg> {
    return this.until(what, () => this.frames.slice(from).find(pred), ms);
  }

  waitLine(what: string, pred: (l: Line) => boolean, from = 0, ms = 15000): Promise<Line> {
    return this.until(what, () => this.lines.slice(from).find(pred), ms);
  }

  until<T>(what: string, probe: () => T | undefined | false, ms = 15000): Promise<T> {
    return new Promise((resolve, reject) => {
      const check = () => {
        const v = probe();
        if (v === undefined || v === false) return;
        this.waiters.delete(check);
        clearTimeout(timer);
        resolve(v);
      };
      const timer = setTimeout(() => {
        this.waiters.delete(check);
        const last = this.frames.slice(-8).map((f) => `${f.op}@${f.addr}`).join(' ');
        reject(new Error(`timed out after ${ms} ms waiting for ${what}; last frames: ${last}`));
      }, ms);
      this.waiters.add(check);
      check();
    });
  }

  async close(): Promise<void> {
    clearInterval(this.kaTimer);
    if (this.port.isOpen) await new Promise<void>((r) => this.port.close(() => r()));
  }

  private onData(chunk: Buffer): void {
    this.raw.push(chunk);
    this.rawBytes += chunk.length;
    this.decoder.push(chunk, (body) => {
      let m: RootMessage;
      try {
        m = parseRootBody(body, TABLE.lengthOf);
      } catch {
        return;
      }
      this.onFrame({ ...m, at: Date.now() });
    });
    for (const w of [...this.waiters]) w();
  }

  private onFrame(m: Msg): void {
    this.frames.push(m);
    const s = this.streams.get(m.addr);
    switch (m.op) {
      case 'node-up':
        this.streams.set(m.addr, { buf: '', expectId: true, live: true });
        break;
      case 'node-down':
        if (s) s.live = false;
        break;
      case 'root-reset':
        for (const x of this.streams.values()) x.live = false;
        break;
      case 'result': {
        this.resultsReceived++;
        const w = this.waiting.shift();
        if (w) w.resolve(m);
        else this.unexpectedResults++;
        break;
      }
      case 'line':
        if (s) this.onLineData(m.addr, s, m.data.toString('utf8'));
        break;
    }
  }

  private onLineData(addr: number, s: { buf: string; expectId: boolean }, text: string): void {
    s.buf += text;
    for (let nl = s.buf.indexOf('\n'); nl >= 0; nl = s.buf.indexOf('\n')) {
      const line = s.buf.slice(0, nl);
      s.buf = s.buf.slice(nl + 1);
      if (s.expectId) {
        s.expectId = false;
        this.lines.push({ addr, kind: 'id', text: line });
        if (this.auto) void this.send('SEND-', addr, '\n');
      } else if (line.length === 0) {
        this.lines.push({ addr, kind: 'ka', text: '' });
      } else if (line.length === 2) {
        this.lines.push({ addr, kind: 'ack', text: line, mid: line });
      } else {
        const mid = line.slice(0, 2);
        this.lines.push({ addr, kind: 'msg', text: line.slice(2), mid });
        if (this.auto) void this.send('SEND-', addr, `${mid}\n`);
      }
    }
  }
}

interface Rig {
  pty: PtyPair;
  peer: MeshPeer;
  emu: MeshRootEmulator;
}

/** socat pair, the peer on end b, the emulator on end a; all torn down after the test. */
async function rig(t: ExecutionContext, opts: Partial<MeshRootEmulatorOptions> = {}): Promise<Rig> {
  const pty = await PtyPair.open('emu');
  t.teardown(() => pty.close());
  const peer = await MeshPeer.open(pty.b);
  t.teardown(() => peer.close());
  const emu = await MeshRootEmulator.open({ path: pty.a, timeout: TIMEOUT, ...opts });
  t.teardown(() => emu.close());
  return { pty, peer, emu };
}

function deferred<T = void>() {
  let resolve!: (v: T) => void;
  const promise = new Promise<T>((r) => (resolve = r));
  return { promise, resolve };
}

/** `p`, or a rejection naming `what` after `ms`. */
function within<T>(p: Promise<T>, what: string, ms = 15000): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([
    p,
    new Promise<T>((_, reject) => (timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms))),
  ]).finally(() => clearTimeout(timer));
}

const idle = async () => {};

test('nodes join with NODE_UP, their ID lines arrive in LINE frames, messages and ACKs flow both ways', async (t) => {
  const { peer, emu } = await rig(t);
  const acked = new Map<string, ReturnType<typeof deferred<void>>>();
  const got = new Map<string, ReturnType<typeof deferred<string>>>();
  const fn = async (client: import('../src/client').Client) => {
    await client.write(`hello from ${client.id}`);
    acked.get(client.id)!.resolve();
    got.get(client.id)!.resolve(await client.readline());
  };
  for (const id of ['n1', 'n2']) {
    acked.set(id, deferred());
    got.set(id, deferred<string>());
  }
  const n1 = emu.addNode('n1', fn);
  const n2 = emu.addNode('n2', fn, { uuid: '00112233-4455-6677-8899-aabbccddeeff' });
  t.is(n1.addr, 1);
  t.is(n2.addr, 2);

  const up1 = await peer.waitFrame('NODE_UP of n1', (m) => m.op === 'node-up' && m.addr === 1);
  const up2 = await peer.waitFrame('NODE_UP of n2', (m) => m.op === 'node-up' && m.addr === 2);
  t.is((up1 as { uuid: string }).uuid, n1.uuid);
  t.is((up2 as { uuid: string }).uuid, '00112233445566778899aabbccddeeff');

  t.is((await peer.waitLine('ID line of n1', (l) => l.kind === 'id' && l.addr === 1)).text, 'n1');
  t.is((await peer.waitLine('ID line of n2', (l) => l.kind === 'id' && l.addr === 2)).text, 'n2');
  // NODE_UP comes before the node's first LINE frame.
  const firstLine = peer.frames.findIndex((m) => m.op === 'line' && m.addr === 1);
  t.true(peer.frames.indexOf(up1) < firstLine);

  const msg = await peer.waitLine('message of n1', (l) => l.kind === 'msg' && l.addr === 1);
  t.is(msg.text, 'hello from n1');
  t.is(msg.mid, '00', 'a fresh client numbers its first message 0');
  await within(Promise.all([acked.get('n1')!.promise, acked.get('n2')!.promise]), 'nodes see the ACKs of their messages');

  void peer.send('SEND-', 1, '00to n1\n');
  void peer.send('SENDI', 2, '00to n2\n');
  t.is(await within(got.get('n1')!.promise, 'n1 reads'), 'to n1\n');
  t.is(await within(got.get('n2')!.promise, 'n2 reads'), 'to n2\n');
  await peer.waitLine('ACK from n1', (l) => l.kind === 'ack' && l.addr === 1 && l.mid === '00');
  await peer.waitLine('ACK from n2', (l) => l.kind === 'ack' && l.addr === 2 && l.mid === '00');
  await peer.waitLine('a keepalive from a node', (l) => l.kind === 'ka');
  t.true(emu.client('n1').isUp);
  t.is(emu.stats.nodeDowns, 0);
});

test('every command gets exactly one RESULT: S, F for failCommands and bad ones, none for silentCommands; NINFO lists the nodes', async (t) => {
  const { peer, emu } = await rig(t, { failCommands: ['CLEAN'], silentCommands: ['RST-R'] });
  const a = emu.addNode('a', idle);
  const b = emu.addNode('b', idle);
  await peer.waitLine('ID line of a', (l) => l.kind === 'id' && l.addr === a.addr);
  await peer.waitLine('ID line of b', (l) => l.kind === 'id' && l.addr === b.addr);

  // Pipelined, as a server with several commands outstanding would send them.
  const sendA = peer.send('SEND-', a.addr, '\n');
  const sendiB = peer.send('SENDI', b.addr, '\n');
  const unknownAddr = peer.send('SEND-', 0x0999, '01lost\n');
  const clean = peer.send('CLEAN', 0);
  void peer.send('RST-R', 0, undefined, false); // silent: never answered
  const unknownCmd = peer.send('XYZZY', 0);
  const short = peer.sendBody(Buffer.from('NIN'), 'short');
  const ninfo = peer.send('NINFO', 0);
  const results = await within(
    Promise.all([sendA, sendiB, unknownAddr, clean, unknownCmd, short, ninfo]),
    'every answered command gets its RESULT',
  );
  const [rA, rB, rAddr, rClean, rCmd, rShort, rInfo] = results as Array<Msg & { ok: boolean; error?: string }>;
  t.true(rA.ok);
  t.true(rB.ok);
  t.false(rAddr.ok);
  t.regex(rAddr.error!, /no node with address 0x0999/);
  t.false(rClean.ok);
  t.regex(rClean.error!, /CLEAN failed/);
  t.false(rCmd.ok);
  t.regex(rCmd.error!, /unknown command "XYZZY"/);
  t.false(rShort.ok);
  t.regex(rShort.error!, /too short/);
  t.true(rInfo.ok);

  const info = peer.frames.filter((m) => m.op === 'net-info');
  t.is(info.length, 1);
  const nodes = (info[0] as { nodes: Array<{ addr: number; uuid: string }> }).nodes;
  t.deepEqual(nodes, [
    { addr: a.addr, uuid: a.uuid },
    { addr: b.addr, uuid: b.uuid },
  ]);
  t.true(peer.frames.indexOf(info[0]) < peer.frames.indexOf(rInfo), 'NET_INFO comes before the RESULT of NINFO');

  // Quiesce the peer's own keepalives, then a last command fences everything sent before it.
  peer.auto = false;
  const fence = await within(peer.send('BCAST', 0, '\n'), 'fence');
  t.true((fence as { ok: boolean }).ok);
  t.is(peer.unexpectedResults, 0, 'no command was answered twice');
  t.is(peer.resultsReceived, peer.commandsSent - 1, 'one RESULT per command, none for the silent RST-R');
  t.false(peer.frames.some((m) => m.op === 'root-reset'), 'the silenced RST-R was not carried out');
  t.is(emu.stats.commands['RST-R'], 1);
  t.is(emu.stats.commands['CLEAN'], 1);
  t.is(emu.stats.commands['NINFO'], 1);
  t.is(emu.stats.commands['XYZZY'], 1);
  t.is(emu.stats.commands['SENDI'], 1);
  t.is(emu.stats.commands['BCAST'], 1);
  t.is(emu.stats.badCommands, 1);
  t.is(emu.stats.silenced, 1);
  t.is(emu.stats.resultsOk + emu.stats.resultsFailed, peer.resultsReceived);
});

test('BCAST reaches every node', async (t) => {
  const { peer, emu } = await rig(t);
  const ids = ['b1', 'b2', 'b3'];
  const got = new Map(ids.map((id) => [id, deferred<string>()]));
  for (const id of ids) emu.addNode(id, async (client) => got.get(client.id)!.resolve(await client.readline()));
  await within(Promise.all(ids.map((id) => emu.client(id).ready())), 'every node link up');
  const r = await within(peer.send('BCAST', 0, '07to everyone\n'), 'RESULT of BCAST');
  t.true((r as { ok: boolean }).ok);
  for (const id of ids) t.is(await within(got.get(id)!.promise, `${id} reads the broadcast`), 'to everyone\n');
  for (const node of emu.nodes()) {
    await peer.waitLine(`ACK 07 from ${node.id}`, (l) => l.kind === 'ack' && l.addr === node.addr && l.mid === '07');
  }
});

test('a node leaves and rejoins; a root reset makes every node rejoin', async (t) => {
  const { peer, emu } = await rig(t);
  const a = emu.addNode('a', idle);
  const b = emu.addNode('b', idle);
  await within(Promise.all([emu.client('a').ready(), emu.client('b').ready()]), 'both links up');

  const down = new Promise<string>((r) => emu.client('b').once('down', r));
  let from = peer.frames.length;
  emu.nodeLeave('b');
  await peer.waitFrame('NODE_DOWN of b', (m) => m.op === 'node-down' && m.addr === b.addr, from);
  t.regex(await within(down, "b's client sees an outage"), /left the mesh/);
  const r = (await within(peer.send('SEND-', b.addr, '\n'), 'RESULT for a node out of the mesh')) as { ok: boolean; error?: string };
  t.false(r.ok);
  t.regex(r.error!, /not in the mesh/);
  const ninfo = peer.frames.length;
  await peer.send('NINFO', 0);
  const info = (await peer.waitFrame('NET_INFO', (m) => m.op === 'net-info', ninfo)) as { nodes: Array<{ addr: number }> };
  t.deepEqual(info.nodes.map((n) => n.addr), [a.addr], 'NET_INFO leaves out the node that left');

  from = peer.frames.length;
  const idsBefore = peer.lines.length;
  t.true(emu.nodeJoin('b'));
  const up = (await peer.waitFrame('NODE_UP of b again', (m) => m.op === 'node-up' && m.addr === b.addr, from)) as { uuid: string };
  t.is(up.uuid, b.uuid, 'same UUID after rejoining');
  t.is((await peer.waitLine('ID line of b again', (l) => l.kind === 'id' && l.addr === b.addr, idsBefore)).text, 'b');
  await peer.until('b up again', () => emu.client('b').connects >= 2);
  t.is(emu.client('a').connects, 1, 'a was not disturbed');

  // Root reset by command: RESULT S first, then ROOT_RESET, then every node rejoins.
  from = peer.frames.length;
  const linesBefore = peer.lines.length;
  const res = (await within(peer.send('RST-R', 0), 'RESULT of RST-R')) as Msg & { ok: boolean };
  t.true(res.ok);
  const reset = await peer.waitFrame('ROOT_RESET', (m) => m.op === 'root-reset', from);
  t.is(reset.addr, 0);
  t.true(peer.frames.indexOf(res) < peer.frames.indexOf(reset));
  for (const n of [a, b]) {
    await peer.waitFrame(`NODE_UP of ${n.id} after the reset`, (m) => m.op === 'node-up' && m.addr === n.addr, from);
    await peer.waitLine(`ID line of ${n.id} after the reset`, (l) => l.kind === 'id' && l.addr === n.addr, linesBefore);
  }
  await peer.until('both up again', () => emu.client('a').connects >= 2 && emu.client('b').connects >= 3);
  t.is(emu.stats.rootResets, 1);
});

test('DATA frames decode with the data-type table, from sendData and from dataEvery', async (t) => {
  const { peer, emu } = await rig(t, { dataTypes: TABLE, dataEvery: 150 });
  const n = emu.addNode('sensor', idle);
  const values = { temperature: -12, humidity: 55, battery_mv: 3900, pressure: 1013.25, uptime_s: 123456, status: 'ok' };
  emu.sendData('sensor', values);
  const decode = (m: Msg) => Object.fromEntries((m as { items: Array<{ type: number; raw: Buffer }> }).items.map((i) => {
    const d = TABLE.decode(i.type, i.raw);
    return [d.name, d.value];
  }));
  const mine = await peer.waitFrame('the DATA frame of sendData', (m) => m.op === 'data' && decode(m).temperature === -12);
  t.is(mine.addr, n.addr);
  t.deepEqual(decode(mine), values);

  const periodic = await peer.until('three periodic DATA frames', () => {
    const f = peer.frames.filter((m) => m.op === 'data' && m !== mine);
    return f.length >= 3 ? f : undefined;
  });
  for (const m of periodic) {
    const v = decode(m);
    t.is(m.addr, n.addr);
    t.deepEqual(Object.keys(v).sort(), TABLE.types().map((x) => x.name).sort());
    t.true((v.temperature as number) >= -40 && (v.temperature as number) <= 60, `temperature ${v.temperature}`);
    t.true((v.battery_mv as number) >= 3000 && (v.battery_mv as number) <= 4500);
    t.is(typeof v.status, 'string');
  }
  t.throws(() => emu.sendData('sensor', { colour: 3 }), { message: /no data type named "colour"/ });
  t.throws(() => emu.sendData('sensor', { humidity: 300 }), { message: /does not fit humidity/ });
});

test('noise, cut frames, oversized frames and unknown opcodes: both decoders skip them and carry on', async (t) => {
  const { peer, emu } = await rig(t);
  emu.injectNoise(Buffer.from('not a frame'));
  emu.writeRaw(Buffer.from([0xff, 0x00, 0x01, 0x00, 0x41])); // cut short by the next start byte
  emu.injectFrame(rootBody(9, 0x77, Buffer.from([1, 2, 3])));
  emu.writeRaw(encodeFrame(Buffer.alloc(5000, 0x01))); // larger than the peer's 4096
  emu.injectFrame(rootBody(7, Op.NODE_DOWN));
  const unknown = await peer.waitFrame('the unknown opcode', (m) => m.op === 'unknown');
  t.is((unknown as { opcode: number }).opcode, 0x77);
  await peer.waitFrame('the frame after the oversized one', (m) => m.op === 'node-down' && m.addr === 7);
  t.is(peer.decoder.stats.noiseBytes, 'not a frame'.length);
  t.is(peer.decoder.stats.restarted, 1);
  t.is(peer.decoder.stats.oversized, 1);

  // The other way: the emulator drops broken command frames and still answers the next one.
  peer.port.write(Buffer.concat([Buffer.from('junk'), Buffer.from([0xff, 0x53, 0x45]), encodeFrame(commandBody('NINFO', 0))]));
  peer.port.write(Buffer.from([0xfa, 0xff, ...Buffer.alloc(5000, 0x20), 0xfe]));
  const r = await within(peer.send('CLEAN', 0), 'RESULT after the junk');
  t.true((r as { ok: boolean }).ok);
  t.is(emu.decoderStats.noiseBytes, 4 + 1); // 'junk' and the escape byte before the start
  t.is(emu.decoderStats.restarted, 1);
  t.is(emu.decoderStats.oversized, 1);
  t.is(emu.stats.commands['NINFO'], 1);
  t.is(emu.stats.framesDropped, 2);
});

test('record, then replay: the same bytes reach the port, at the recorded pace divided by speed', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-dump-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'dump.jsonl');

  // Record a short session: a node joins, talks, DATA frames.
  const pty1 = await PtyPair.open('rec');
  t.teardown(() => pty1.close());
  const peer1 = await MeshPeer.open(pty1.b);
  t.teardown(() => peer1.close());
  const rec = await MeshRootEmulator.open({ path: pty1.a, timeout: TIMEOUT, record: file, dataTypes: TABLE, chatterEvery: 200 });
  t.teardown(() => rec.close());
  rec.addNode('r1');
  await peer1.until('three messages from the node', () => peer1.lines.filter((l) => l.kind === 'msg').length >= 3);
  rec.sendData('r1', { temperature: 21, status: 'ok' });
  await peer1.waitFrame('DATA', (m) => m.op === 'data');
  await rec.close();

  const dump = readDump(file);
  t.true(dump.length > 10);
  const dumpBytes = Buffer.concat(dump.map((c) => c.data));
  t.is(rec.stats.bytesOut, dumpBytes.length, 'every byte written is in the dump');
  await peer1.until('the peer has every recorded byte', () => peer1.rawBytes >= dumpBytes.length);
  t.true(Buffer.concat(peer1.raw).equals(dumpBytes), 'the dump holds exactly what went over the wire');
  for (let i = 1; i < dump.length; i++) t.true(dump[i].t >= dump[i - 1].t);

  // Replay it on a second pty pair to a passive peer.
  const pty2 = await PtyPair.open('play');
  t.teardown(() => pty2.close());
  const peer2 = await MeshPeer.open(pty2.b);
  peer2.auto = false;
  t.teardown(() => peer2.close());
  const player = await MeshRootEmulator.open({ path: pty2.a, timeout: TIMEOUT });
  t.teardown(() => player.close());
  const speed = 4;
  const started = Date.now();
  const res = await within(player.replay(file, { speed }), 'replay at speed 4');
  const took = Date.now() - started;
  t.deepEqual(res, { chunks: dump.length, bytes: dumpBytes.length, complete: true });
  const span = dump[dump.length - 1].t / speed;
  t.true(took >= span - 50, `replay took ${took} ms for a span of ${span} ms`);
  await peer2.until('the replayed bytes', () => peer2.rawBytes >= dumpBytes.length);
  t.true(Buffer.concat(peer2.raw).equals(dumpBytes), 'replay reproduces the recorded bytes');
  t.deepEqual(
    peer2.frames.map((m) => m.op),
    peer1.frames.map((m) => m.op),
    'the same frames decode on both sides',
  );

  // As fast as possible: the same bytes again.
  const again = await within(player.replay(file, { speed: Infinity }), 'replay at full speed');
  t.is(again.bytes, dumpBytes.length);
  await peer2.until('the second replay', () => peer2.rawBytes >= 2 * dumpBytes.length);
  t.true(Buffer.concat(peer2.raw).subarray(dumpBytes.length).equals(dumpBytes));
});

test("with tether's own UART transport: nodes become Connections, talk both ways, DATA lands in telemetry, a rejoin reattaches", async (t) => {
  const pty = await PtyPair.open('e2e');
  t.teardown(() => pty.close());
  const server = new Server({ timeout: TIMEOUT, logger: silentLogger });
  t.teardown(() => server.close());
  const mesh = new MeshTransport(server, { path: pty.b, dataTypes: TABLE });
  t.teardown(() => mesh.close());
  await within(mesh.open(), 'the transport opens its end');
  const emu = await MeshRootEmulator.open({ path: pty.a, timeout: TIMEOUT, dataTypes: TABLE });
  t.teardown(() => emu.close());

  const node = emu.addNode('m1', async (client) => {
    await client.write('ping');
    for await (const line of client) await client.write(`echo:${line.trimEnd()}`);
  });
  const conn = await within(server.clientConn('m1'), 'the node becomes a Connection');
  t.is(conn.remote, `mesh:0x0001`);
  t.is(await within(conn.readline(), 'first line'), 'ping\n');
  await within(conn.write('pong'), 'the node ACKs');
  t.is(await within(conn.readline(), 'echo'), 'echo:pong\n');

  emu.sendData('m1', { temperature: 23, humidity: 41, status: 'ok' });
  await peerless(() => conn.telemetry.latest('humidity')?.value === 41, 'DATA in the telemetry');
  t.is(conn.telemetry.latest('temperature')?.value, 23);
  t.deepEqual(await within(mesh.netInfo(), 'NINFO'), [{ addr: node.addr, uuid: node.uuid }]);

  const down = new Promise((r) => conn.once('down', r));
  emu.nodeLeave('m1');
  await within(down, 'the Connection sees the node leave');
  emu.nodeJoin('m1');
  await peerless(() => conn.isUp && conn.counters.connects === 2, 'the node reattaches to the same Connection', 15000);
  t.is(server.get('m1'), conn);
  await within(conn.write('again'), 'a write after the rejoin is ACKed');
  t.is(await within(conn.readline(), 'echo after the rejoin'), 'echo:again\n');
});

test('the stream option: any open Duplex instead of a serial port, left open by close()', async (t) => {
  const frames: RootMessage[] = [];
  const decoder = new FrameDecoder();
  const stream = new Duplex({
    read() {},
    write(chunk: Buffer, _enc, cb) {
      decoder.push(chunk, (b) => frames.push(parseRootBody(b, TABLE.lengthOf)));
      cb();
    },
  });
  const emu = await MeshRootEmulator.open({ stream, timeout: TIMEOUT });
  const n = emu.addNode('s1', idle);
  stream.push(encodeFrame(commandBody('NINFO', 0)));
  await peerless(() => frames.some((m) => m.op === 'result'), 'the RESULT of NINFO');
  t.deepEqual(
    frames.filter((m) => m.op !== 'line').map((m) => m.op),
    ['node-up', 'net-info', 'result'],
  );
  t.deepEqual((frames.find((m) => m.op === 'net-info') as { nodes: unknown[] }).nodes, [{ addr: n.addr, uuid: n.uuid }]);
  t.true(frames.some((m) => m.op === 'line' && m.data.toString() === 's1\n'), 'the ID line');
  await emu.close();
  t.false(stream.destroyed);
  t.throws(() => emu.addNode('late'), { message: /after close\(\)/ });
});

/** Polls a condition (no serial peer to hang an event on); bounded. */
async function peerless(cond: () => boolean, what: string, ms = 10000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms: ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function runCli(args: string[], ms = 30000): Promise<{ code: number | null; out: string; err: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [BIN, ...args], { timeout: ms, cwd: ROOT }, (e, out, err) =>
      resolve({ code: e ? ((e as { code?: number }).code ?? null) : 0, out, err }),
    );
  });
}

test('tether emulate: a missing serial port says how to make a pty pair', async (t) => {
  const r = await runCli(['emulate', '--serial', path.join(os.tmpdir(), 'no-such-tty-for-tether')]);
  t.is(r.code, 1);
  t.regex(r.err, /does not exist/);
  t.regex(r.err, /socat -d -d pty,raw,echo=0/);
});

test('tether emulate: nodes mesh-1..N join, talk and send DATA over a pty; --replay plays the example dump', async (t) => {
  const pty = await PtyPair.open('cli');
  t.teardown(() => pty.close());
  const peer = await MeshPeer.open(pty.b);
  t.teardown(() => peer.close());
  const args = ['emulate', '--serial', pty.a, '--nodes', '2', '--timeout', String(TIMEOUT), '--duration', '6'];
  args.push('--data-types', 'examples/data-types.json', '--data-every', '500', '--log-format', 'json');
  const child = spawn(process.execPath, [BIN, ...args], { cwd: ROOT });
  let out = '';
  let err = '';
  child.stdout.on('data', (d) => (out += d));
  child.stderr.on('data', (d) => (err += d));
  const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  t.teardown(() => child.kill('SIGKILL'));

  for (const [addr, id] of [[1, 'mesh-1'], [2, 'mesh-2']] as const) {
    await peer.waitFrame(`NODE_UP ${addr}`, (m) => m.op === 'node-up' && m.addr === addr, 0, 20000);
    t.is((await peer.waitLine(`ID line ${id}`, (l) => l.kind === 'id' && l.addr === addr, 0, 20000)).text, id);
  }
  const m = await peer.waitLine('a chatter message', (l) => l.kind === 'msg', 0, 20000);
  t.regex(m.text, /^\{"node":"mesh-\d","n":1/);
  await peer.waitFrame('DATA', (f) => f.op === 'data', 0, 20000);
  t.is(await within(exited, 'emulate exits after --duration', 20000), 0, err + out);
  t.regex(out, /mesh root emulator running/);

  // The example dump replays as fast as possible and the command exits by itself.
  const dumpFile = path.join(ROOT, 'examples', 'mesh-dump.jsonl');
  const expected = Buffer.concat(readDump(dumpFile).map((c) => c.data));
  peer.auto = false;
  const before = peer.rawBytes;
  const r = await runCli(['emulate', '--serial', pty.a, '--replay', dumpFile, '--speed', '0']);
  t.is(r.code, 0, r.err + r.out);
  await peer.until('the example dump', () => peer.rawBytes - before >= expected.length);
  t.true(Buffer.concat(peer.raw).subarray(before).equals(expected));
});
