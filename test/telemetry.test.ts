/**
 * Unit tests of src/telemetry.ts: the per-name ring history (Telemetry) and the
 * data-type table that decodes the mesh root's DATA values (DataTypeTable).
 * Pure code: explicit timestamps, temp files only for load().
 */
import test from 'ava';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { TetherError } from '../src/errors';
import { encodeFrame, FrameDecoder, Op, parseRootBody, rootBody } from '../src/protocol/frames';
import { DataType, DataTypeTable, ENCODINGS, Encoding, Telemetry, TelemetryValue } from '../src/telemetry';

// ---- helpers ----------------------------------------------------------------

const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');

/** Values of `name`, oldest first. */
const values = (tel: Telemetry, name: string, from?: number, to?: number) => tel.query(name, from, to).map((s) => s.value);
const times = (tel: Telemetry, name: string, from?: number, to?: number) => tel.query(name, from, to).map((s) => s.t);

const badConfig = (message: RegExp) => ({ instanceOf: TetherError, message }) as const;

function isBadConfig(t: { true(v: boolean, m?: string): void }, e: unknown) {
  t.true(e instanceof TetherError && e.code === 'ERR_BAD_CONFIG', `ERR_BAD_CONFIG, got ${String(e)}`);
}

// ---- Telemetry ------------------------------------------------------------------

test('Telemetry: record, query, latest, names', (t) => {
  const tel = new Telemetry(10);
  tel.record('temp', 20.5, 100);
  tel.record('temp', 21, 200);
  tel.record('door', true, 150);
  tel.record('label', 'kitchen', 160);
  tel.record('temp', -3, 300);
  t.deepEqual(tel.query('temp'), [
    { t: 100, value: 20.5 },
    { t: 200, value: 21 },
    { t: 300, value: -3 },
  ]);
  t.deepEqual(tel.latest('temp'), { t: 300, value: -3 });
  t.deepEqual(tel.latest('door'), { t: 150, value: true });
  t.deepEqual(tel.latest('label'), { t: 160, value: 'kitchen' });
  t.deepEqual(tel.names(), ['temp', 'door', 'label']);
});

test('Telemetry: the default history size is 1000 and the default time is now', (t) => {
  const tel = new Telemetry();
  t.is(tel.maxPerName, 1000);
  const before = Date.now();
  tel.record('x', 1);
  const after = Date.now();
  const s = tel.latest('x')!;
  t.true(s.t >= before && s.t <= after);
  for (let i = 0; i < 1500; i++) tel.record('y', i, i);
  t.deepEqual(values(tel, 'y'), Array.from({ length: 1000 }, (_, i) => 500 + i));
});

test('Telemetry: unknown names give nothing', (t) => {
  const tel = new Telemetry(3);
  t.deepEqual(tel.query('nope'), []);
  t.deepEqual(tel.query('nope', 0, 10), []);
  t.is(tel.latest('nope'), undefined);
  t.deepEqual(tel.snapshot(), {});
  t.deepEqual(tel.names(), []);
  tel.record('a', 1, 1);
  t.deepEqual(tel.query('A'), [], 'names are case sensitive');
  t.is(tel.latest('b'), undefined);
  t.deepEqual(tel.names(), ['a']);
});

test('Telemetry: the ring keeps exactly the last maxPerName samples, in order, through many wrap-arounds', (t) => {
  for (const max of [1, 2, 3, 5, 8]) {
    const tel = new Telemetry(max);
    for (let n = 1; n <= max * 4 + 3; n++) {
      tel.record('v', n, n * 10);
      const want = Array.from({ length: Math.min(n, max) }, (_, i) => n - Math.min(n, max) + 1 + i);
      t.deepEqual(values(tel, 'v'), want, `max ${max}, after ${n}`);
      t.deepEqual(times(tel, 'v'), want.map((v) => v * 10));
      t.deepEqual(tel.latest('v'), { t: n * 10, value: n }, `latest, max ${max}, after ${n}`);
    }
  }
});

test('Telemetry: names have independent rings', (t) => {
  const tel = new Telemetry(3);
  for (let i = 0; i < 10; i++) tel.record('a', i, i);
  tel.record('b', 'x', 100);
  for (let i = 10; i < 12; i++) tel.record('a', i, i);
  t.deepEqual(values(tel, 'a'), [9, 10, 11]);
  t.deepEqual(values(tel, 'b'), ['x']);
  t.deepEqual(tel.snapshot(), { a: { t: 11, value: 11 }, b: { t: 100, value: 'x' } });
});

test('Telemetry: query by time range is inclusive on both ends', (t) => {
  const tel = new Telemetry(10);
  for (const ts of [10, 20, 30, 40]) tel.record('v', ts / 10, ts);
  t.deepEqual(times(tel, 'v', 20, 30), [20, 30]);
  t.deepEqual(times(tel, 'v', 15, 35), [20, 30]);
  t.deepEqual(times(tel, 'v', 10, 40), [10, 20, 30, 40]);
  t.deepEqual(times(tel, 'v', 40, 40), [40]);
  t.deepEqual(times(tel, 'v', 10, 10), [10]);
  t.deepEqual(times(tel, 'v', 41), []);
  t.deepEqual(times(tel, 'v', undefined, 9), []);
  t.deepEqual(times(tel, 'v', 30, 20), [], 'from after to');
  t.deepEqual(times(tel, 'v', 25), [30, 40], 'only from');
  t.deepEqual(times(tel, 'v', undefined, 25), [10, 20], 'only to');
  t.deepEqual(times(tel, 'v', -Infinity, Infinity), [10, 20, 30, 40]);
});

test('Telemetry: query by time range after the ring wrapped', (t) => {
  const tel = new Telemetry(4);
  for (let i = 1; i <= 10; i++) tel.record('v', i, i * 100); // keeps 700..1000
  t.deepEqual(times(tel, 'v'), [700, 800, 900, 1000]);
  t.deepEqual(times(tel, 'v', 0, 750), [700]);
  t.deepEqual(times(tel, 'v', 800, 900), [800, 900]);
  t.deepEqual(times(tel, 'v', 0, 600), [], 'overwritten samples are gone');
});

test('Telemetry: samples recorded out of time order are kept in recording order', (t) => {
  const tel = new Telemetry(5);
  tel.record('v', 'b', 20);
  tel.record('v', 'a', 10);
  tel.record('v', 'c', 30);
  t.deepEqual(values(tel, 'v'), ['b', 'a', 'c']);
  t.deepEqual(values(tel, 'v', 10, 20), ['b', 'a']);
  t.deepEqual(tel.latest('v'), { t: 30, value: 'c' }, 'latest is the last recorded');
});

test('Telemetry: query returns a fresh array', (t) => {
  const tel = new Telemetry(3);
  for (let i = 0; i < 2; i++) tel.record('v', i, i);
  tel.query('v').length = 0;
  tel.query('v').push({ t: 99, value: 99 });
  t.deepEqual(values(tel, 'v'), [0, 1]);
});

test('Telemetry: snapshot has the latest sample of every name', (t) => {
  const tel = new Telemetry(2);
  tel.record('temp', 1, 1);
  tel.record('temp', 2, 2);
  tel.record('temp', 3, 3); // wraps
  tel.record('on', false, 5);
  t.deepEqual(tel.snapshot(), { temp: { t: 3, value: 3 }, on: { t: 5, value: false } });
});

test('Telemetry: snapshot keeps names that are Object.prototype keys', (t) => {
  const tel = new Telemetry(2);
  for (const [i, name] of ['__proto__', 'constructor', 'toString', 'hasOwnProperty'].entries()) tel.record(name, i, i);
  const snap = tel.snapshot();
  t.deepEqual(Object.keys(snap).sort(), ['__proto__', 'constructor', 'hasOwnProperty', 'toString']);
  t.deepEqual(Object.getOwnPropertyDescriptor(snap, '__proto__')?.value, { t: 0, value: 0 });
  t.is(Object.getPrototypeOf(snap), Object.prototype, 'the prototype is not replaced by a sample');
  t.deepEqual(snap.constructor as unknown, { t: 1, value: 1 });
});

test('Telemetry: bad history sizes are rejected', (t) => {
  for (const bad of [0, -1, 1.5, Number.NaN, Infinity, -Infinity]) {
    const e = t.throws(() => new Telemetry(bad), badConfig(/history size must be a positive integer/), String(bad));
    isBadConfig(t, e);
  }
  t.notThrows(() => new Telemetry(1));
});

// ---- DataTypeTable: encode / decode -----------------------------------------

const ALL_TYPES: DataType[] = [
  { name: 'i8', id: 1, length: 1, encoding: 'int8' },
  { name: 'u8', id: 2, length: 1, encoding: 'uint8' },
  { name: 'i16', id: 3, length: 2, encoding: 'int16' },
  { name: 'u16', id: 4, length: 2, encoding: 'uint16' },
  { name: 'i32', id: 5, length: 4, encoding: 'int32' },
  { name: 'u32', id: 6, length: 4, encoding: 'uint32' },
  { name: 'f32', id: 7, length: 4, encoding: 'float32' },
  { name: 'f64', id: 8, length: 8, encoding: 'float64' },
  { name: 'flag', id: 9, length: 1, encoding: 'bool' },
  { name: 'label', id: 10, length: 8, encoding: 'utf8' },
  { name: 'one', id: 0, length: 1, encoding: 'utf8' },
  { name: 'max', id: 255, length: 255, encoding: 'utf8' },
];

const EXACT: Array<[number, TelemetryValue[]]> = [
  [1, [-128, -1, 0, 1, 127]],
  [2, [0, 1, 128, 255]],
  [3, [-32768, -1, 0, 0x1234, 32767]],
  [4, [0, 1, 0x1234, 65535]],
  [5, [-2147483648, -123456789, -1, 0, 2147483647]],
  [6, [0, 1, 0xdeadbeef, 4294967295]],
  [8, [0, -0, 1, -1.5, Math.PI, -Math.E, 1e308, -1e-308, Number.MIN_VALUE, Number.MAX_VALUE, 0.1 + 0.2, Infinity, -Infinity]],
  [9, [true, false]],
  [10, ['', 'a', 'hi', 'kitchen', '12345678', 'héllo']],
  [0, ['x', '']],
];

for (const order of ['big', 'little'] as const) {
  test(`DataTypeTable (${order} endian): every encoding round-trips exactly`, (t) => {
    const table = new DataTypeTable(ALL_TYPES, order);
    t.is(table.littleEndian, order === 'little');
    for (const [id, vals] of EXACT) {
      for (const v of vals) {
        const raw = table.encode(id, v);
        t.is(raw.length, table.get(id)!.length, `length of id ${id}`);
        const d = table.decode(id, raw);
        t.is(d.name, table.get(id)!.name);
        t.is(d.value, v, `id ${id} value ${String(v)}`); // t.is uses Object.is: -0 stays -0
      }
    }
    t.true(Number.isNaN(table.decode(8, table.encode(8, Number.NaN)).value as number), 'float64 NaN');
  });

  test(`DataTypeTable (${order} endian): float32 round-trips to single precision`, (t) => {
    const table = new DataTypeTable(ALL_TYPES, order);
    for (const v of [0, 1, -1, 0.5, 3.14159, -273.15, 1e-3, 123456.789, 3.4e38]) {
      const got = table.decode(7, table.encode(7, v)).value as number;
      t.is(got, Math.fround(v), `float32 ${v}`);
      t.true(Math.abs(got - v) <= Math.abs(v) * 2 ** -23, `float32 ${v} close: ${got}`);
    }
    t.is(table.decode(7, table.encode(7, Infinity)).value, Infinity);
    t.true(Number.isNaN(table.decode(7, table.encode(7, Number.NaN)).value as number));
  });

  test(`DataTypeTable (${order} endian): utf8 is NUL padded, and the padding is stripped`, (t) => {
    const table = new DataTypeTable(ALL_TYPES, order);
    t.is(hex(table.encode(10, 'hi')), '6869000000000000');
    t.is(hex(table.encode(10, '')), '0000000000000000');
    t.is(table.decode(10, Buffer.from('hi\0\0\0\0\0\0', 'latin1')).value, 'hi');
    t.is(table.decode(10, Buffer.from('12345678')).value, '12345678', 'full length, no padding');
    t.is(table.decode(10, Buffer.from('a\0b\0\0\0\0\0', 'latin1')).value, 'a\0b', 'only trailing NULs go');
    t.is(table.decode(10, table.encode(10, 'too long for eight')).value, 'too long', 'encode truncates to the length');
    // A multi-byte character that does not fit is left out whole, not cut in half.
    t.is(table.decode(10, table.encode(10, 'abcdefg✓')).value, 'abcdefg');
    t.is(table.decode(255, table.encode(255, 'z'.repeat(300))).value, 'z'.repeat(255));
    t.is(table.decode(10, table.encode(10, 42)).value, '42', 'non-strings are written as text');
  });

  test(`DataTypeTable (${order} endian): bool`, (t) => {
    const table = new DataTypeTable(ALL_TYPES, order);
    t.is(hex(table.encode(9, true)), '01');
    t.is(hex(table.encode(9, false)), '00');
    t.is(hex(table.encode(9, 0)), '00');
    t.is(hex(table.encode(9, 7)), '01');
    for (let b = 0; b < 256; b++) t.is(table.decode(9, Buffer.from([b])).value, b !== 0);
  });
}

test('DataTypeTable: byte order decides the wire bytes of multi-byte values', (t) => {
  const big = new DataTypeTable(ALL_TYPES);
  const little = new DataTypeTable(ALL_TYPES, 'little');
  t.false(big.littleEndian, 'big is the default');
  const cases: Array<[number, TelemetryValue, string]> = [
    [3, -2, 'fffe'],
    [4, 0x1234, '1234'],
    [4, 65535, 'ffff'],
    [5, -2, 'fffffffe'],
    [5, 0x01020304, '01020304'],
    [6, 0xdeadbeef, 'deadbeef'],
    [7, 1, '3f800000'],
    [8, 1, '3ff0000000000000'],
  ];
  for (const [id, v, bigHex] of cases) {
    const littleHex = Buffer.from(bigHex, 'hex').reverse().toString('hex');
    t.is(hex(big.encode(id, v)), bigHex, `big id ${id}`);
    t.is(hex(little.encode(id, v)), littleHex, `little id ${id}`);
    t.is(big.decode(id, Buffer.from(bigHex, 'hex')).value, v);
    t.is(little.decode(id, Buffer.from(littleHex, 'hex')).value, v);
  }
  // Single bytes do not depend on the order.
  t.is(hex(big.encode(1, -128)), '80');
  t.is(hex(little.encode(1, -128)), '80');
  t.is(little.decode(1, Buffer.from('ff', 'hex')).value, -1);
  t.is(little.decode(2, Buffer.from('ff', 'hex')).value, 255);
});

test('DataTypeTable: values out of range of their encoding throw', (t) => {
  const table = new DataTypeTable(ALL_TYPES);
  t.throws(() => table.encode(1, 128));
  t.throws(() => table.encode(1, -129));
  t.throws(() => table.encode(2, 256));
  t.throws(() => table.encode(2, -1));
  t.throws(() => table.encode(4, 65536));
  t.throws(() => table.encode(5, 2 ** 31));
  t.throws(() => table.encode(6, -1));
});

test('DataTypeTable: unknown ids are errors on encode and decode', (t) => {
  const table = new DataTypeTable(ALL_TYPES);
  for (const id of [11, 254, 256, -1]) {
    isBadConfig(t, t.throws(() => table.decode(id, Buffer.alloc(1)), badConfig(new RegExp(`unknown data type id ${id}`))));
    isBadConfig(t, t.throws(() => table.encode(id, 1), badConfig(new RegExp(`unknown data type id ${id}`))));
  }
});

test('DataTypeTable: get, types and lengthOf', (t) => {
  const table = new DataTypeTable(ALL_TYPES);
  t.deepEqual(table.get(4), { name: 'u16', id: 4, length: 2, encoding: 'uint16' });
  t.is(table.get(42), undefined);
  t.deepEqual(table.types(), ALL_TYPES);
  t.is(table.lengthOf(10), 8);
  t.is(table.lengthOf(255), 255);
  t.is(table.lengthOf(42), undefined);
  const { lengthOf } = table; // usable detached, as parseRootBody's lengths function
  t.is(lengthOf(8), 8);
  t.deepEqual(new DataTypeTable([]).types(), []);
  // Every encoding with a fixed size is listed with that size.
  t.deepEqual({ ...ENCODINGS }, { int8: 1, uint8: 1, int16: 2, uint16: 2, int32: 4, uint32: 4, float32: 4, float64: 8, bool: 1, utf8: -1 });
});

test('DataTypeTable: a DATA frame decodes into named values', (t) => {
  const table = DataTypeTable.fromJSON({ byteOrder: 'little', types: ALL_TYPES });
  const want: Array<[number, TelemetryValue]> = [
    [3, -300],
    [7, 0.5],
    [9, true],
    [10, 'ok'],
    [6, 4000000000],
  ];
  const data = Buffer.concat([Buffer.from([want.length]), ...want.map(([id, v]) => Buffer.concat([Buffer.from([id]), table.encode(id, v)]))]);
  const frame = encodeFrame(rootBody(0x0102, Op.DATA, data));
  const bodies: Buffer[] = [];
  new FrameDecoder().push(frame, (b) => bodies.push(b));
  t.is(bodies.length, 1);
  const m = parseRootBody(bodies[0], table.lengthOf);
  if (m.op !== 'data') return t.fail(`got ${m.op}`);
  t.is(m.addr, 0x0102);
  t.deepEqual(
    m.items.map((i) => table.decode(i.type, i.raw)),
    [
      { name: 'i16', value: -300 },
      { name: 'f32', value: 0.5 },
      { name: 'flag', value: true },
      { name: 'label', value: 'ok' },
      { name: 'u32', value: 4000000000 },
    ],
  );
  // And into a device's history.
  const tel = new Telemetry(5);
  for (const i of m.items) {
    const { name, value } = table.decode(i.type, i.raw);
    tel.record(name, value, 1000);
  }
  t.deepEqual(tel.snapshot().label, { t: 1000, value: 'ok' });
});

// ---- DataTypeTable: validation ---------------------------------------------------

const ok = (over: Partial<Record<keyof DataType, unknown>> = {}) => ({ name: 'temp', id: 1, length: 2, encoding: 'int16', ...over }) as DataType;

test('DataTypeTable: a duplicate id is rejected', (t) => {
  const e = t.throws(() => new DataTypeTable([ok(), ok({ name: 'other' })]), badConfig(/data type "other": id 1 is used twice/));
  isBadConfig(t, e);
  t.regex(e!.message, /^data-type table: /);
  t.notThrows(() => new DataTypeTable([ok(), ok({ name: 'other', id: 2 })]));
});

test('DataTypeTable: a bad encoding is rejected, listing the valid ones', (t) => {
  for (const encoding of ['int64', 'INT16', 'float', '', undefined, null, 16, 'toString', 'constructor', '__proto__', 'hasOwnProperty']) {
    const e = t.throws(
      () => new DataTypeTable([ok({ encoding })]),
      badConfig(/data type "temp": "encoding" must be one of int8, uint8, int16, uint16, int32, uint32, float32, float64, bool, utf8/),
      String(encoding),
    );
    isBadConfig(t, e);
  }
  for (const encoding of Object.keys(ENCODINGS) as Encoding[]) {
    const length = ENCODINGS[encoding] > 0 ? ENCODINGS[encoding] : 5;
    t.notThrows(() => new DataTypeTable([{ name: 'x', id: 3, length, encoding }]), encoding);
  }
});

test('DataTypeTable: fixed-size encodings need their exact length', (t) => {
  const fixed = Object.entries(ENCODINGS).filter(([, n]) => n > 0) as Array<[Encoding, number]>;
  for (const [encoding, size] of fixed) {
    for (const length of [size - 1, size + 1, 0, 3, undefined]) {
      if (length === size) continue;
      isBadConfig(
        t,
        t.throws(() => new DataTypeTable([ok({ encoding, length })]), badConfig(new RegExp(`"length" must be ${size} for ${encoding}$`)), `${encoding} ${length}`),
      );
    }
  }
  // utf8 takes any length 1-255.
  for (const length of [0, 256, -1, 1.5, '8', undefined]) {
    t.throws(() => new DataTypeTable([ok({ encoding: 'utf8', length })]), badConfig(/"length" must be 1-255 for utf8/), String(length));
  }
  for (const length of [1, 2, 100, 255]) t.notThrows(() => new DataTypeTable([ok({ encoding: 'utf8', length })]));
});

test('DataTypeTable: ids must be integers 0-255', (t) => {
  for (const id of [-1, 256, 1.5, '3', undefined, null, Number.NaN]) {
    isBadConfig(t, t.throws(() => new DataTypeTable([ok({ id })]), badConfig(/data type "temp": "id" must be 0-255/), String(id)));
  }
  for (const id of [0, 255]) t.notThrows(() => new DataTypeTable([ok({ id })]));
});

test('DataTypeTable: every type needs a name', (t) => {
  for (const bad of [ok({ name: '' }), ok({ name: undefined }), ok({ name: 7 }), null, undefined, 'temp']) {
    isBadConfig(t, t.throws(() => new DataTypeTable([bad as DataType]), badConfig(/every data type needs a "name"/), JSON.stringify(bad)));
  }
});

test('DataTypeTable.fromJSON: a plain list, or { types } with an optional byteOrder', (t) => {
  const list = [ok(), ok({ name: 'hum', id: 2, encoding: 'uint16' })];
  const a = DataTypeTable.fromJSON(list);
  t.false(a.littleEndian, 'a plain list is big endian');
  t.deepEqual(a.types(), list);
  const b = DataTypeTable.fromJSON({ types: list });
  t.false(b.littleEndian, '{ types } without byteOrder is big endian');
  t.deepEqual(b.types(), list);
  t.false(DataTypeTable.fromJSON({ byteOrder: 'big', types: list }).littleEndian);
  const c = DataTypeTable.fromJSON({ byteOrder: 'little', types: list });
  t.true(c.littleEndian);
  t.is(hex(c.encode(2, 0x1234)), '3412');
  t.deepEqual(DataTypeTable.fromJSON([]).types(), []);
  t.deepEqual(DataTypeTable.fromJSON({ types: [] }).types(), []);
});

test('DataTypeTable.fromJSON: a bad shape or byteOrder is rejected', (t) => {
  for (const raw of [null, undefined, 42, 'types', {}, { types: {} }, { types: 'x' }, { type: [] }]) {
    isBadConfig(t, t.throws(() => DataTypeTable.fromJSON(raw), badConfig(/expected a list of types or \{ "types": \[\.\.\.\] \}/), JSON.stringify(raw)));
  }
  for (const byteOrder of ['middle', 'BIG', 'le', '', null, 1, true]) {
    isBadConfig(t, t.throws(() => DataTypeTable.fromJSON({ byteOrder, types: [] }), badConfig(/"byteOrder" must be "big" or "little"/), String(byteOrder)));
  }
  // Errors in an entry come through fromJSON unchanged.
  t.throws(() => DataTypeTable.fromJSON([ok(), ok()]), badConfig(/id 1 is used twice/));
});

// ---- DataTypeTable.load ------------------------------------------------------------

function tempDir(t: { teardown(fn: () => void): void }): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-telemetry-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

test('DataTypeTable.load: reads a JSON file', (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'types.json');
  fs.writeFileSync(file, JSON.stringify({ byteOrder: 'little', types: ALL_TYPES }, null, 2));
  const table = DataTypeTable.load(file);
  t.true(table.littleEndian);
  t.deepEqual(table.types(), ALL_TYPES);
  t.is(table.decode(4, Buffer.from('3412', 'hex')).value, 0x1234);

  const listFile = path.join(dir, 'list.json');
  fs.writeFileSync(listFile, JSON.stringify(ALL_TYPES));
  const list = DataTypeTable.load(listFile);
  t.false(list.littleEndian);
  t.is(list.decode(4, Buffer.from('1234', 'hex')).value, 0x1234);
});

test('DataTypeTable.load: a missing file says which file and what to do', (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'nope.json');
  const e = t.throws(() => DataTypeTable.load(file), badConfig(/cannot read .*nope\.json.*ENOENT.*check the path/));
  isBadConfig(t, e);
  t.true(e!.message.includes(file));
});

test('DataTypeTable.load: a file that is not JSON says so', (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'broken.json');
  fs.writeFileSync(file, '{ "types": [ ');
  const e = t.throws(() => DataTypeTable.load(file), badConfig(/cannot read .*broken\.json.*check the path and the JSON/));
  isBadConfig(t, e);
});

test('DataTypeTable.load: an invalid table names the file and the problem once', (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'dup.json');
  fs.writeFileSync(file, JSON.stringify([ok(), ok({ name: 'again' })]));
  const e = t.throws(() => DataTypeTable.load(file), badConfig(/data type "again": id 1 is used twice/));
  isBadConfig(t, e);
  t.true(e!.message.includes(file));
  t.is(e!.message, `data-type table: ${file}: data type "again": id 1 is used twice`);

  fs.writeFileSync(file, JSON.stringify({ byteOrder: 'sideways', types: [] }));
  t.throws(() => DataTypeTable.load(file), badConfig(/dup\.json: "byteOrder" must be "big" or "little"/));
});
