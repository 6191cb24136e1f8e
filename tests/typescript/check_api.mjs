// Do herald.js and herald.d.ts name the same public API?
//
//   node check_api.mjs [path/to/herald.js [path/to/herald.d.ts]]
//
// The module's exports, each exported class's public methods, getters, static members
// and instance fields (read from real instances, since herald.js sets its fields in the
// constructors) are taken from herald.js as Node loads it; the declared ones from
// herald.d.ts through TypeScript's type checker.  Names starting with "_" are private by
// convention and skipped.  Every public name of herald.js must be declared, and every
// name herald.d.ts declares must exist in herald.js; every event herald.js emits by name
// and every `where` of its error events must be declared too.  Exits 1 and lists each
// mismatch.

import { readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import ts from "typescript";

const here = path.dirname(fileURLToPath(import.meta.url));
const static_ = path.resolve(here, "../../src/herald/static");
const jsPath = path.resolve(process.argv[2] ?? path.join(static_, "herald.js"));
const dtsPath = path.resolve(process.argv[3] ?? path.join(jsPath.replace(/\.js$/, ".d.ts")));

const isPublic = (name) => !name.startsWith("_") && name !== "constructor";

// ---------------------------------------------------------------- what herald.js has

const runtime = await import(pathToFileURL(jsPath).href);

/** Public names of a class: [instance names, static names], from its prototype and an instance. */
function runtimeMembers(name, cls) {
  const instance = makeInstance(name, cls);
  const names = new Set(Object.getOwnPropertyNames(cls.prototype).filter(isPublic));
  for (const key of Object.keys(instance)) if (isPublic(key)) names.add(key);
  const statics = Object.getOwnPropertyNames(cls).filter((key) => isPublic(key) && !["length", "name", "prototype"].includes(key));
  return [names, new Set(statics)];
}

function makeInstance(name, cls) {
  // Constructing does no I/O: HeraldClient opens its socket in connect().
  if (name === "HeraldClient") return new cls("ws://127.0.0.1:1/connect", {});
  if (name === "Subscription") return new cls(new runtime.HeraldClient("ws://127.0.0.1:1/connect"), "c", {});
  return new cls(0, "message");
}

const isClass = (value) => typeof value === "function" && /^class\b/.test(Function.prototype.toString.call(value));

// ---------------------------------------------------------------- what herald.d.ts declares

const program = ts.createProgram([dtsPath], { strict: true, noEmit: true, target: ts.ScriptTarget.ES2022, lib: ["lib.es2022.d.ts", "lib.dom.d.ts"], types: [] });
const checker = program.getTypeChecker();
const source = program.getSourceFile(dtsPath);
if (!source) {
  console.error(`cannot read ${dtsPath}`);
  process.exit(2);
}
const problems = ts.getPreEmitDiagnostics(program).map((d) => `herald.d.ts does not compile: ${ts.flattenDiagnosticMessageText(d.messageText, "\n")}`);
const moduleSymbol = checker.getSymbolAtLocation(source);
const declaredExports = new Map();
for (const symbol of checker.getExportsOfModule(moduleSymbol)) {
  const target = symbol.flags & ts.SymbolFlags.Alias ? checker.getAliasedSymbol(symbol) : symbol;
  if (target.flags & ts.SymbolFlags.Value) declaredExports.set(symbol.escapedName, target);
}

const declaredHere = (symbol) => (symbol.declarations ?? []).some((d) => d.getSourceFile() === source);

/** Declared names of a class: [instance names (inherited included), names declared in herald.d.ts, static names]. */
function declaredMembers(symbol) {
  const instanceType = checker.getDeclaredTypeOfSymbol(symbol);
  const all = new Set();
  const own = new Set();
  for (const prop of checker.getPropertiesOfType(instanceType)) {
    all.add(prop.name);
    if (declaredHere(prop)) own.add(prop.name);
  }
  const staticType = checker.getTypeOfSymbolAtLocation(symbol, source);
  const statics = new Set(checker.getPropertiesOfType(staticType).map((p) => p.name).filter((n) => n !== "prototype"));
  return [all, own, statics];
}

// ---------------------------------------------------------------- compare

const runtimeExports = Object.keys(runtime);
for (const name of runtimeExports) {
  if (!declaredExports.has(name)) problems.push(`herald.js exports ${name}, herald.d.ts does not declare it`);
}
for (const name of declaredExports.keys()) {
  if (!(name in runtime)) problems.push(`herald.d.ts declares export ${name}, herald.js does not export it`);
}

for (const name of runtimeExports) {
  const value = runtime[name];
  const symbol = declaredExports.get(name);
  if (!symbol || name === "default") continue;
  if (isClass(value)) {
    if (!(symbol.flags & ts.SymbolFlags.Class)) {
      problems.push(`${name} is a class in herald.js but not in herald.d.ts`);
      continue;
    }
    const [names, statics] = runtimeMembers(name, value);
    const [declared, declaredOwn, declaredStatics] = declaredMembers(symbol);
    for (const member of names) {
      if (!declared.has(member)) problems.push(`${name}.${member} exists in herald.js, not in herald.d.ts`);
    }
    const instance = makeInstance(name, value);
    for (const member of declaredOwn) {
      if (!(member in instance)) problems.push(`herald.d.ts declares ${name}.${member}, herald.js has no such member`);
    }
    for (const member of statics) {
      if (!declaredStatics.has(member)) problems.push(`static ${name}.${member} exists in herald.js, not in herald.d.ts`);
    }
    for (const member of declaredStatics) {
      if (!(member in value)) problems.push(`herald.d.ts declares static ${name}.${member}, herald.js has no such member`);
    }
  } else if (value && typeof value === "object") {
    // A constant object (ClientErrorCode): the same keys.
    const type = checker.getTypeOfSymbolAtLocation(symbol, source);
    const declared = new Set(checker.getPropertiesOfType(type).map((p) => p.name));
    for (const key of Object.keys(value)) {
      if (!declared.has(key)) problems.push(`${name}.${key} exists in herald.js, not in herald.d.ts`);
    }
    for (const key of declared) {
      if (!(key in value)) problems.push(`herald.d.ts declares ${name}.${key}, herald.js has no such key`);
    }
  }
}
// Events: every event herald.js emits by name, and every `where` of its "error" events,
// is declared (HeraldEventMap, ErrorSource).  Read from the source: they are string literals.
const jsSource = readFileSync(jsPath, "utf8");
const declaredType = (name) => {
  const symbol = checker.getExportsOfModule(moduleSymbol).find((s) => s.escapedName === name);
  return symbol ? checker.getDeclaredTypeOfSymbol(symbol) : null;
};
const eventMap = declaredType("HeraldEventMap");
const eventNames = new Set(eventMap ? checker.getPropertiesOfType(eventMap).map((p) => p.name) : []);
for (const [, event] of jsSource.matchAll(/_emit\("([^"]+)"/g)) {
  if (!eventNames.has(event)) problems.push(`herald.js emits "${event}", HeraldEventMap does not declare it`);
}
const errorSource = declaredType("ErrorSource");
const wheres = new Set((errorSource?.isUnion() ? errorSource.types : errorSource ? [errorSource] : []).map((t) => t.value));
for (const [, where] of jsSource.matchAll(/where: "([^"]+)"/g)) {
  if (!wheres.has(where)) problems.push(`herald.js reports errors from "${where}", ErrorSource does not declare it`);
}

if (declaredExports.has("default") && runtime.default !== runtime.HeraldClient) {
  problems.push("herald.js's default export is no longer HeraldClient, as herald.d.ts says");
}

if (problems.length) {
  console.error(`herald.js and herald.d.ts disagree (${problems.length}):`);
  for (const problem of problems) console.error(`  - ${problem}`);
  process.exit(1);
}
console.log(`herald.d.ts declares all ${runtimeExports.length} exports of herald.js and their public members`);
