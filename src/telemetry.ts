/**
 * Telemetry: named, time-stamped values per device, kept in bounded rings, and
 * the data-type table that decodes the mesh root's DATA frames into them.
 */
import * as fs from 'node:fs';
import { TetherError } from './errors';

export type TelemetryValue = number | string | boolean;

export interface Sample {
  t: number;
  value: TelemetryValue;
}

/** One device's history: per name, the last `maxPerName` samples. */
export class Telemetry {
  private readonly series = new Map<string, { buf: Sample[]; next: number }>();

  constructor(readonly maxPerName = 1000) {
    if (!(Number.isInteger(maxPerName) && maxPerName > 0)) {
      throw new TetherError('ERR_BAD_CONFIG', `telemetry history size must be a positive integer, got ${maxPerName}`);
    }
  }

  record(name: string, value: TelemetryValue, t = Date.now()): void {
    let s = this.series.get(name);
    if (!s) this.series.set(name, (s = { buf: [], next: 0 }));
    if (s.buf.length < this.maxPerName) s.buf.push({ t, value });
    else {
      s.buf[s.next] = { t, value };
      s.next = (s.next + 1) % this.maxPerName;
    }
  }

  names(): string[] {
    return [...this.series.keys()];
  }

  /** Samples of `name`, oldest first, with `from <= t <= to`. */
  query(name: string, from = -Infinity, to = Infinity): Sample[] {
    const s = this.series.get(name);
    if (!s) return [];
    const ordered = s.buf.length < this.maxPerName ? s.buf : [...s.buf.slice(s.next), ...s.buf.slice(0, s.next)];
    return ordered.filter((x) => x.t >= from && x.t <= to);
  }

  latest(name: string): Sample | undefined {
    const s = this.series.get(name);
    if (!s || s.buf.length === 0) return undefined;
    return s.buf.length < this.maxPerName ? s.buf[s.buf.length - 1] : s.buf[(s.next + this.maxPerName - 1) % this.maxPerName];
  }

  /** Latest value of every name. */
  snapshot(): Record<string, Sample> {
    // fromEntries defines own properties, so a name like "__proto__" is kept as a key.
    return Object.fromEntries([...this.series.keys()].map((n) => [n, this.latest(n)!]));
  }
}

export const ENCODINGS = {
  int8: 1,
  uint8: 1,
  int16: 2,
  uint16: 2,
  int32: 4,
  uint32: 4,
  float32: 4,
  float64: 8,
  bool: 1,
  utf8: -1, // length from the table
} as const;
export type Encoding = keyof typeof ENCODINGS;

export interface DataType {
  name: string;
  id: number;
  length: number;
  encoding: Encoding;
}

/**
 * The data-type table: `{ "byteOrder": "big"|"little", "types": [{ "name",
 * "id", "length", "encoding" }] }` (or just the list; byte order then big).
 */
export class DataTypeTable {
  private readonly byId = new Map<number, DataType>();
  readonly littleEndian: boolean;

  constructor(types: DataType[], byteOrder: 'big' | 'little' = 'big') {
    this.littleEndian = byteOrder === 'little';
    for (const t of types) {
      const where = `data type ${JSON.stringify(t?.name)}`;
      if (!t || typeof t.name !== 'string' || !t.name) throw bad(`every data type needs a "name"`);
      if (!Number.isInteger(t.id) || t.id < 0 || t.id > 255) throw bad(`${where}: "id" must be 0-255`);
      if (this.byId.has(t.id)) throw bad(`${where}: id ${t.id} is used twice`);
      if (!Object.hasOwn(ENCODINGS, t.encoding)) throw bad(`${where}: "encoding" must be one of ${Object.keys(ENCODINGS).join(', ')}`);
      const fixed = ENCODINGS[t.encoding];
      if (!Number.isInteger(t.length) || t.length < 1 || t.length > 255 || (fixed > 0 && t.length !== fixed)) {
        throw bad(`${where}: "length" must be ${fixed > 0 ? fixed : '1-255'} for ${t.encoding}`);
      }
      this.byId.set(t.id, t);
    }
  }

  static fromJSON(raw: unknown): DataTypeTable {
    if (Array.isArray(raw)) return new DataTypeTable(raw as DataType[]);
    const o = raw as { byteOrder?: unknown; types?: unknown };
    if (!o || typeof o !== 'object' || !Array.isArray(o.types)) throw bad('expected a list of types or { "types": [...] }');
    if (o.byteOrder !== undefined && o.byteOrder !== 'big' && o.byteOrder !== 'little') throw bad('"byteOrder" must be "big" or "little"');
    return new DataTypeTable(o.types as DataType[], o.byteOrder as 'big' | 'little' | undefined);
  }

  static load(file: string): DataTypeTable {
    let raw: unknown;
    try {
      raw = JSON.parse(fs.readFileSync(file, 'utf8'));
    } catch (e) {
      throw bad(`cannot read ${file} (${(e as Error).message}): check the path and the JSON`);
    }
    try {
      return DataTypeTable.fromJSON(raw);
    } catch (e) {
      throw bad(`${file}: ${(e as Error).message.replace(/^data-type table: /, '')}`);
    }
  }

  get(id: number): DataType | undefined {
    return this.byId.get(id);
  }

  types(): DataType[] {
    return [...this.byId.values()];
  }

  lengthOf = (id: number): number | undefined => this.byId.get(id)?.length;

  decode(id: number, raw: Buffer): { name: string; value: TelemetryValue } {
    const t = this.byId.get(id);
    if (!t) throw bad(`unknown data type id ${id}`);
    const le = this.littleEndian;
    let value: TelemetryValue;
    switch (t.encoding) {
      case 'int8': value = raw.readInt8(0); break;
      case 'uint8': value = raw.readUInt8(0); break;
      case 'int16': value = le ? raw.readInt16LE(0) : raw.readInt16BE(0); break;
      case 'uint16': value = le ? raw.readUInt16LE(0) : raw.readUInt16BE(0); break;
      case 'int32': value = le ? raw.readInt32LE(0) : raw.readInt32BE(0); break;
      case 'uint32': value = le ? raw.readUInt32LE(0) : raw.readUInt32BE(0); break;
      case 'float32': value = le ? raw.readFloatLE(0) : raw.readFloatBE(0); break;
      case 'float64': value = le ? raw.readDoubleLE(0) : raw.readDoubleBE(0); break;
      case 'bool': value = raw[0] !== 0; break;
      case 'utf8': value = raw.toString('utf8').replace(/\0+$/, ''); break;
    }
    return { name: t.name, value };
  }

  encode(id: number, value: TelemetryValue): Buffer {
    const t = this.byId.get(id);
    if (!t) throw bad(`unknown data type id ${id}`);
    const b = Buffer.alloc(t.length);
    const le = this.littleEndian;
    const n = Number(value);
    switch (t.encoding) {
      case 'int8': b.writeInt8(n); break;
      case 'uint8': b.writeUInt8(n); break;
      case 'int16': if (le) b.writeInt16LE(n); else b.writeInt16BE(n); break;
      case 'uint16': if (le) b.writeUInt16LE(n); else b.writeUInt16BE(n); break;
      case 'int32': if (le) b.writeInt32LE(n); else b.writeInt32BE(n); break;
      case 'uint32': if (le) b.writeUInt32LE(n); else b.writeUInt32BE(n); break;
      case 'float32': if (le) b.writeFloatLE(n); else b.writeFloatBE(n); break;
      case 'float64': if (le) b.writeDoubleLE(n); else b.writeDoubleBE(n); break;
      case 'bool': b[0] = value ? 1 : 0; break;
      case 'utf8': b.write(String(value), 'utf8'); break;
    }
    return b;
  }
}

function bad(msg: string): TetherError {
  return new TetherError('ERR_BAD_CONFIG', `data-type table: ${msg}`);
}
