/**
 * What depends on how tether runs: from its TypeScript sources (development and tests, through
 * ts-node) or compiled (dist/, the installed package, with no TypeScript at run time).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

/** True when this is the compiled code (dist/src/runtime.js). */
export const COMPILED = path.basename(path.dirname(__dirname)) === 'dist';
/** The package's top folder: the parent of src/, or of dist/ when compiled. */
export const PACKAGE_ROOT = COMPILED ? path.resolve(__dirname, '..', '..') : path.resolve(__dirname, '..');

let version: string | undefined;

/** tether's version, from its package.json. */
export function packageVersion(): string {
  if (version === undefined) {
    try {
      version = String((JSON.parse(fs.readFileSync(path.join(PACKAGE_ROOT, 'package.json'), 'utf8')) as { version: unknown }).version);
    } catch {
      version = 'unknown';
    }
  }
  return version;
}

const TS_EXT = /\.(c|m)?ts$/;

/**
 * What to require() for a TypeScript script (an app) at `file`, an absolute path:
 * - compiled tether, and the script is one of tether's own (examples/*.ts): its compiled twin in
 *   dist/, so the demo needs no TypeScript and shares the modules of the running tether;
 * - a TypeScript loader is registered (development and tests run under ts-node): the file;
 * - compiled tether, and ts-node can be found beside the script, in the working directory or
 *   beside tether: ts-node is registered now (transpile only), then the file.
 * Undefined when nothing can load it; throws when ts-node is there but cannot start.
 */
export function typeScriptTarget(file: string): string | undefined {
  if (COMPILED) {
    const twin = compiledTwin(file);
    if (twin) return twin;
  }
  if (require.extensions[path.extname(file)]) return file;
  if (COMPILED && registerTsNode(file)) return file;
  return undefined;
}

/** dist/…/x.js for PACKAGE_ROOT/…/x.ts, if it was built. */
function compiledTwin(file: string): string | undefined {
  const rel = path.relative(PACKAGE_ROOT, file);
  if (!TS_EXT.test(rel) || rel.startsWith('..') || path.isAbsolute(rel) || rel.split(path.sep).includes('node_modules')) return undefined;
  const js = rel.replace(TS_EXT, '.js');
  const twin = rel.split(path.sep)[0] === 'dist' ? path.join(PACKAGE_ROOT, js) : path.join(PACKAGE_ROOT, 'dist', js);
  return fs.existsSync(twin) ? twin : undefined;
}

/** Registers ts-node for the scripts from here on; false when it is not installed. */
function registerTsNode(file: string): boolean {
  const dir = path.dirname(file);
  let tsNode: string;
  try {
    tsNode = require.resolve('ts-node', { paths: [dir, process.cwd(), PACKAGE_ROOT] });
  } catch {
    return false;
  }
  try {
    // With a tsconfig.json of the app's own, its settings rule; without one, ts-node's defaults
    // (module NodeNext without the matching moduleResolution) fail on TypeScript 5.9: CommonJS it is.
    const compilerOptions = hasTsconfig(dir) ? undefined : { module: 'commonjs' };
    (require(tsNode) as typeof import('ts-node')).register({ transpileOnly: true, projectSearchDir: dir, compilerOptions });
  } catch (e) {
    throw new Error(
      `it is TypeScript, and ts-node (${path.dirname(tsNode)}) could not start: ${String((e as Error).message).split('\n')[0]}. ` +
        'ts-node 10 needs the typescript package at version 5: npm install --save-dev typescript@5 in the app\'s folder, ' +
        'or compile the app to JavaScript (npx tsc) and give tether the .js file',
    );
  }
  return true;
}

/** A tsconfig.json in `dir` or a folder above it (where ts-node looks). */
function hasTsconfig(dir: string): boolean {
  for (let d = dir; ; d = path.dirname(d)) {
    if (fs.existsSync(path.join(d, 'tsconfig.json'))) return true;
    if (path.dirname(d) === d) return false;
  }
}
