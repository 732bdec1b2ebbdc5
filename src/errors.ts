/**
 * Typed errors. Every message says what happened and what to do about it; `code`
 * is stable for programs to branch on.
 */
export type TetherErrorCode =
  | 'ERR_EMPTY_PAYLOAD'
  | 'ERR_NEWLINE_IN_PAYLOAD'
  | 'ERR_LINE_TOO_LONG'
  | 'ERR_CLOSED'
  | 'ERR_ABORTED'
  | 'ERR_BAD_CONFIG'
  | 'ERR_BAD_APP'
  | 'ERR_MESH_COMMAND'
  | 'ERR_MESH_TIMEOUT'
  | 'ERR_MESH_PORT'
  | 'ERR_MESH_RESET'
  | 'ERR_BUSY';

export class TetherError extends Error {
  constructor(
    readonly code: TetherErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'TetherError';
  }
}

export function payloadError(problem: string, maxLineLength: number): TetherError {
  switch (problem) {
    case 'empty':
      return new TetherError(
        'ERR_EMPTY_PAYLOAD',
        'cannot write an empty line: on the wire it would read as an ACK. Send at least one character.',
      );
    case 'newline':
      return new TetherError(
        'ERR_NEWLINE_IN_PAYLOAD',
        'cannot write a line with "\\n" inside it: the protocol is line based. Split it into several writes or encode it (e.g. JSON.stringify).',
      );
    default:
      return new TetherError(
        'ERR_LINE_TOO_LONG',
        `line too long: with its 2-digit id it exceeds maxLineLength (${maxLineLength} bytes). Shorten it or raise maxLineLength on both ends.`,
      );
  }
}

/**
 * A line longer than what the device's link can carry (`limit`: the link's
 * maxLineLength, e.g. one mesh frame), counted as maxLineLength counts: bytes
 * with the 2-digit message id, without the `\n`.
 */
export function lineTooLongForLink(bytes: number, limit: number, remote: string | undefined): TetherError {
  return new TetherError(
    'ERR_LINE_TOO_LONG',
    `line too long for this device's link${remote ? ` (${remote})` : ''}: ${bytes} bytes with its 2-digit id, the link carries at most ${limit} in one frame. ` +
      `Shorten it, or split it into lines of at most ${limit - 2} bytes and join them in the device's code.`,
  );
}

export function closedError(what: string): TetherError {
  return new TetherError('ERR_CLOSED', `${what} is closed: create a new one (or do not close it while it is in use).`);
}

/** A write given up through its AbortSignal. */
export function abortedError(reason?: unknown): TetherError {
  return new TetherError(
    'ERR_ABORTED',
    `write aborted (${why(reason)}); if the line was already sent it may or may not have been delivered`,
  );
}

/** Any other wait (ready, clientConn…) given up through its AbortSignal. */
export function waitAbortedError(what: string): (reason: unknown) => TetherError {
  return (reason) => new TetherError('ERR_ABORTED', `${what} aborted (${why(reason)})`);
}

function why(reason: unknown): string {
  return reason instanceof Error ? reason.message : reason !== undefined ? String(reason) : 'aborted by its signal';
}
