/**
 * The server side of one client ID: created when that ID first connects and kept
 * for the life of the server. Every reconnect of the ID reattaches its new link
 * here, so the id counter, duplicate ring and unacknowledged messages carry on.
 */
import { checkInt, Endpoint, EndpointOptions } from './endpoint';
import type { Link } from './link';
import type { Journal, RestoredState } from './store';
import { Telemetry, TelemetryValue } from './telemetry';

export interface ConnectionOptions extends EndpointOptions {
  /** ms to wait, after the first bytes from a (re)connected device, before sending it messages (the ESP8266 needs it). Default 200. */
  settleDelay?: number;
  /** Samples kept per telemetry name and device. Default 1000. */
  telemetryHistory?: number;
}

/** Durable state handed over by the Server when persistence is on. */
export interface Durable {
  journal: Journal;
  restored: RestoredState | null;
}

export const CONNECTION_DEFAULTS = { settleDelay: 200, telemetryHistory: 1000 } as const;

export class Connection extends Endpoint {
  private readonly settleAfter: number;
  private readonly historySize: number;
  private history?: Telemetry;

  constructor(
    readonly id: string,
    private readonly lookup: (id: string) => Connection | undefined,
    opts: ConnectionOptions,
    durable?: Durable,
  ) {
    super({ ...opts, logger: opts.logger?.child({ client: id }) });
    if (durable) {
      this.journal = durable.journal;
      if (durable.restored) this.restore(durable.restored);
    }
    this.settleAfter = checkInt('settleDelay', opts.settleDelay ?? CONNECTION_DEFAULTS.settleDelay, 0);
    this.historySize = checkInt('telemetryHistory', opts.telemetryHistory ?? CONNECTION_DEFAULTS.telemetryHistory, 1);
  }

  /** Type the device declared in its ID line (`id##type##{json}`), if any. */
  declaredType?: string;
  /** Metadata the device declared in its ID line; {} if none. */
  meta: Record<string, unknown> = {};

  /** Used by the Server with what the latest ID line declared. */
  declare(type?: string, meta?: Record<string, unknown>): void {
    if (type !== undefined) this.declaredType = type;
    if (meta !== undefined) this.meta = meta;
  }

  /** Another client's Connection, if that ID has connected (the original's `conn[id]`). */
  peer(id: string): Connection | undefined {
    return this.lookup(id);
  }

  /** This device's telemetry history (fed by mesh DATA frames and by apps through record()). */
  get telemetry(): Telemetry {
    return (this.history ??= new Telemetry(this.historySize));
  }

  /** Adds a telemetry sample; emits `telemetry` (name, value, t). Latest values are then served without asking the device. */
  record(name: string, value: TelemetryValue, t = Date.now()): void {
    this.telemetry.record(name, value, t);
    this.emit('telemetry', name, value, t);
  }

  /** True while a link is attached (the duplicate-ID policy looks at this). */
  get hasLink(): boolean {
    return this.linked;
  }

  /**
   * Used by the Server: makes `link` this Connection's link, replacing any old
   * one. `boot`: the boot id the device announced in its ID line, if any (lets
   * the mid-0 rule tell a resend from a reboot across links).
   */
  attach(link: Link, rest?: Buffer, boot?: string): void {
    this.peerBoot = boot;
    this.attachLink(link, rest, true, this.settleAfter);
  }

  /** Drops the current link, as an outage (the device will reconnect). */
  disconnect(reason = 'disconnected by the server'): void {
    this.dropLink(reason);
  }

  protected describe(): string {
    return `connection ${JSON.stringify(this.id)}`;
  }
}
