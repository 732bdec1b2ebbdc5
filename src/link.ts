/**
 * A link is one live byte duplex to one device: a TCP socket, a TLS socket, a mesh
 * node behind the UART root. Transports make links; an Endpoint owns one at a time.
 * Links know nothing of the protocol.
 */
export interface LinkHandlers {
  /** Bytes from the peer. */
  data(chunk: Buffer): void;
  /** The link died on its own (peer closed, socket error, node left the mesh). */
  close(reason: string): void;
  /** A write that returned false has drained. */
  drain(): void;
}

export interface Link {
  /** Where the bytes come from, for logs: `tcp:127.0.0.1:51234`, `mesh:0x0012`. */
  readonly remote: string;
  /** The source that per-address limits count (an IP address); default: `remote`. */
  readonly address?: string;
  /** The client ID a verified TLS client certificate proves, if any. */
  readonly certId?: string | null;
  /**
   * The longest line (bytes without `\n`, message id included) this link can
   * carry, when its transport limits it below maxLineLength: a mesh node's link
   * carries one frame (maxFrame − 8). Writes longer than this are refused up
   * front. Default: no limit of its own.
   */
  readonly maxLineLength?: number;
  /** Sends bytes; false means the transport is full: hold further messages until `drain`. */
  write(data: string): boolean;
  /** Stop delivering `data` (flow control toward the peer) / start again. */
  pause(): void;
  resume(): void;
  /** Tears the link down now. Idempotent; does not call the `close` handler. */
  close(reason: string): void;
  /** Installs the owner's handlers (null detaches them). */
  setHandlers(h: LinkHandlers | null): void;
}
