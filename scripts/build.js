#!/usr/bin/env node
'use strict';
// `npm run build`: compiles src/ and examples/ with tsc -p tsconfig.build.json into dist/
// (JavaScript and type declarations) and copies what the compiled code reads at run time next
// to it: the dashboard's files (dist/dashboard) and the example data (dist/examples).
//
//   node scripts/build.js           incremental build
//   node scripts/build.js --clean   empties dist/ first (npm pack runs this, as prepack)
//
// Also run by `npm ci`/`npm install` (prepare). In a production install (npm ci --omit=dev)
// TypeScript is absent: an existing build is kept; without one, it says how to get one.
const fs = require('node:fs');
const path = require('node:path');
const { spawnSync } = require('node:child_process');

const root = path.join(__dirname, '..');
const dist = path.join(root, 'dist');
const event = process.env.npm_lifecycle_event;

function fail(msg) {
  process.stderr.write(`tether build: ${msg}\n`);
  process.exit(1);
}

if (!fs.existsSync(path.join(root, 'tsconfig.build.json')) || !fs.existsSync(path.join(root, 'src'))) {
  // An unpacked package (npm ci inside it runs prepare too): it carries its build already.
  process.exit(0);
}
const cmd = process.env.npm_command;
if (event === 'prepare' && (cmd === 'pack' || cmd === 'publish')) {
  // prepack has just made a clean build.
  process.exit(0);
}

let tsc;
try {
  tsc = require.resolve('typescript/bin/tsc', { paths: [root] });
} catch {
  if (fs.existsSync(path.join(dist, 'src', 'cli.js'))) {
    if (event === 'prepare' || event === 'build') {
      process.stderr.write('tether build: TypeScript is not installed (a production install): keeping the build in dist/\n');
    }
    process.exit(0);
  }
  fail(
    'TypeScript is not installed (npm ci --omit=dev leaves it out), and there is no build in dist/ yet. ' +
      'Build with the development dependencies first (npm ci, or npm run build after it), or install ' +
      'the packed package instead, which carries its build (npm pack, then npm install -g ./tether-*.tgz).',
  );
}

if (process.argv.includes('--clean')) fs.rmSync(dist, { recursive: true, force: true });

const r = spawnSync(process.execPath, [tsc, '-p', path.join(root, 'tsconfig.build.json')], { cwd: root, stdio: 'inherit' });
if (r.status !== 0) fail(`tsc found errors (above); dist/ is not up to date. Fix them and run npm run build again.`);

// What the compiled code reads relative to its own place (dist/src/../dashboard, ../examples).
fs.cpSync(path.join(root, 'dashboard'), path.join(dist, 'dashboard'), { recursive: true });
for (const f of fs.readdirSync(path.join(root, 'examples'))) {
  if (!/\.ts$/.test(f)) fs.cpSync(path.join(root, 'examples', f), path.join(dist, 'examples', f), { recursive: true });
}
// bin/tether.js compares the sources' times with this to warn about a stale build.
fs.writeFileSync(path.join(dist, '.built'), `${new Date().toISOString()}\n`);
