// Runs the compiled ground.ts: node run.mjs BASE_URL API_KEY IMAGE.png TARGET; prints its result as JSON.
import { readFile } from "node:fs/promises";

import { firstBox } from "./out/ground.js";

const [baseUrl, apiKey, imagePath, target] = process.argv.slice(2);
const image = new Blob([await readFile(imagePath)], { type: "image/png" });
console.log(JSON.stringify(await firstBox(baseUrl, apiKey, image, target)));
