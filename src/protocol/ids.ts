/**
 * Message ids and the receiver's duplicate filter (PROTOCOL.md 1.3).
 */

/**
 * Hands out message ids 0, 1, 2 … 255, 1, 2 … 255, 1 …: 0 only for the very first
 * message of a fresh sender, which tells the receiver "I have restarted".
 */
export class MidGenerator {
  private nextMid: number;

  constructor(next = 0) {
    this.nextMid = next;
  }

  /** The id the next call to {@link take} returns. */
  get next(): number {
    return this.nextMid;
  }

  take(): number {
    const mid = this.nextMid;
    this.nextMid = mid >= 255 ? 1 : mid + 1;
    return mid;
  }
}

/**
 * The 256-bit ring of recently seen message ids. A message is new if its bit is
 * clear; seeing it sets the bit and clears the eight ids half a ring away, so ids
 * are forgotten well before the sender reuses them. Sound only while fewer than
 * about 120 messages are outstanding, hence the small in-flight window elsewhere.
 */
export class DuplicateRing {
  private readonly bits = new Uint8Array(32);

  clear(): void {
    this.bits.fill(0);
  }

  /**
   * Records `mid` and says whether it was new. Mid 0 means the sender restarted,
   * so it clears the ring first. The far byte is cleared on duplicates as well,
   * exactly as the original does, so both ends' rings evolve the same way.
   */
  isNew(mid: number): boolean {
    if (mid === 0) this.bits.fill(0);
    const idx = mid >> 3;
    const bit = 1 << (mid & 7);
    const fresh = (this.bits[idx] & bit) === 0;
    this.bits[idx] |= bit;
    this.bits[(idx + 16) & 0x1f] = 0;
    return fresh;
  }

  /** Records `mid` as seen (and clears the far byte) without the mid-0 restart rule. */
  mark(mid: number): void {
    const idx = mid >> 3;
    this.bits[idx] |= 1 << (mid & 7);
    this.bits[(idx + 16) & 0x1f] = 0;
  }

  /** Whether `mid`'s bit is set (seen recently), without recording anything. */
  has(mid: number): boolean {
    return (this.bits[mid >> 3] & (1 << (mid & 7))) !== 0;
  }

  /** True if exactly `mid`'s bit and no other is set. */
  onlyHas(mid: number): boolean {
    const idx = mid >> 3;
    for (let i = 0; i < 32; i++) {
      const expect = i === idx ? 1 << (mid & 7) : 0;
      if (this.bits[i] !== expect) return false;
    }
    return true;
  }

  /** A copy of the ring's 32 bytes (for persistence and tests). */
  snapshot(): Uint8Array {
    return this.bits.slice();
  }

  restore(bytes: Uint8Array): void {
    if (bytes.length !== 32) throw new RangeError(`a duplicate ring is 32 bytes, got ${bytes.length}`);
    this.bits.set(bytes);
  }
}

/**
 * The receiver's decision for each message line: new (deliver) or repeat (ACK
 * and drop). The duplicate ring plus tether's mid-0 rule (docs/protocol.md
 * section 6.2): mid 0 means "the sender restarted" and clears the ring, except
 * when it is provably a retransmission of the first message whose ACK was lost:
 *
 *  - it arrives on the same link as the mid 0 taken before, with the same
 *    payload (a reboot always opens a new link, so this is never a new boot); or
 *  - the peer announced a boot id (tether's clients can, in the ID line) and it
 *    is the same boot id as when the last mid 0 was taken, same payload.
 *
 * Anything else is a restart, exactly as in the original: a deep-sleep board
 * that wakes (reboots), reconnects and sends the same reading with mid 0 has
 * every reading delivered. Deterministic, so replaying the same mids and links
 * rebuilds the same state.
 */
export class ReceiveFilter {
  readonly ring = new DuplicateRing();
  /** Payload of the last mid-0 message taken as new. */
  lastMid0: string | null = null;
  /** Which link (see newLink) the last mid 0 came on, and the peer's boot id then. */
  private mid0Link = -1;
  private mid0Boot: string | undefined;
  private link = 0;
  private boot: string | undefined;

  /** A new link from the peer begins; `boot` is the boot id it announced, if any. */
  newLink(boot?: string): void {
    this.link++;
    this.boot = boot;
  }

  /**
   * A message published again from the recent past (an MQTT bridge's replay
   * after a broker restart): new only if its id is not in the ring. Mid 0 here
   * is an old message, not a restart of the sender, so it clears nothing.
   */
  acceptReplay(mid: number, payload: string): boolean {
    if (this.ring.has(mid) || (mid === 0 && this.lastMid0 === payload)) return false;
    this.ring.mark(mid);
    return true;
  }

  /** Whether a mid 0 with this payload is the retransmission of the one taken before. */
  private resentMid0(payload: string): boolean {
    if (this.lastMid0 !== payload) return false;
    if (this.mid0Link === this.link) return true;
    return this.boot !== undefined && this.boot === this.mid0Boot;
  }

  /** Whether accept() would call this message a repeat, without recording it. */
  isRepeat(mid: number, payload: string): boolean {
    if (mid === 0) return this.resentMid0(payload);
    return this.ring.has(mid);
  }

  /** Records a received message; true if it is new. */
  accept(mid: number, payload: string): boolean {
    if (mid === 0 && this.resentMid0(payload)) {
      this.ring.mark(0);
      return false;
    }
    if (!this.ring.isNew(mid)) return false;
    if (mid === 0) {
      this.lastMid0 = payload;
      this.mid0Link = this.link;
      this.mid0Boot = this.boot;
    }
    return true;
  }
}
