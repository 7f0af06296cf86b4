// Prints every way around the type checker in TypeScript files, one per line, and exits 1 if there is
// any: `x as T`, `<T>x`, `x!`, `any`, and @ts- comments. Usage: node casts.mjs FILE...
import { readFileSync } from "node:fs";

import ts from "typescript";

const found = [];
for (const path of process.argv.slice(2)) {
  const text = readFileSync(path, "utf8");
  const file = ts.createSourceFile(path, text, ts.ScriptTarget.Latest, true);
  const report = (node, what) => {
    const { line } = file.getLineAndCharacterOfPosition(node.getStart(file));
    found.push(`${path}:${line + 1}: ${what}`);
  };
  const visit = (node) => {
    if (ts.isAsExpression(node) || ts.isTypeAssertionExpression(node)) report(node, "cast");
    else if (ts.isNonNullExpression(node)) report(node, "non-null assertion");
    else if (node.kind === ts.SyntaxKind.AnyKeyword) report(node, "any");
    ts.forEachChild(node, visit);
  };
  visit(file);
  for (const match of text.matchAll(/@ts-(ignore|expect-error|nocheck)/g)) {
    found.push(`${path}:${text.slice(0, match.index).split("\n").length}: ${match[0]}`);
  }
}
console.log(found.join("\n"));
process.exit(found.length ? 1 : 0);
