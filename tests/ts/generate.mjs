// Generates TypeScript types from a MedMO Serve schema with openapi-typescript:
//   node generate.mjs openapi.json medmo.ts
// openapi-typescript types every string schema as `string`, files included; its documented way to type
// files is a transform. A file here is what OpenAPI 3.1 says is raw bytes: a string with a
// contentMediaType and no contentEncoding (a base64 image in JSON keeps its contentEncoding and stays a
// string). Any TypeScript client of this API generated with openapi-typescript needs the same transform.
import { readFile, writeFile } from "node:fs/promises";

import openapiTS, { astToString } from "openapi-typescript";
import ts from "typescript";

const BLOB = ts.factory.createTypeReferenceNode(ts.factory.createIdentifier("Blob"));

const [schemaPath, outputPath] = process.argv.slice(2);
const schema = JSON.parse(await readFile(schemaPath, "utf8"));
const ast = await openapiTS(schema, {
  transform(schemaObject) {
    if (schemaObject.type === "string" && schemaObject.contentMediaType && !schemaObject.contentEncoding) {
      return BLOB;
    }
    return undefined;
  },
});
await writeFile(outputPath, astToString(ast));
