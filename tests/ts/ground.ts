// A typed call to POST /ground with a client generated from the live schema, written the way another
// team would: openapi-fetch over openapi-typescript's types, the image sent as a Blob, no casts. The test
// compiles it with tsc --strict and runs it against a real server.
import createClient from "openapi-fetch";

import type { components, paths } from "./medmo.js";

type GroundUpload = components["schemas"]["GroundUpload"];

export interface FirstBox {
  label: string | null;
  x_min: number;
  box_convention: string;
}

function multipart(upload: GroundUpload): FormData {
  const form = new FormData();
  for (const image of upload.image) {
    form.append("image", image);
  }
  if (upload.target) {
    form.append("target", upload.target);
  }
  return form;
}

export async function firstBox(baseUrl: string, apiKey: string, image: Blob, target: string): Promise<FirstBox> {
  // A 200 is JSON unless a DICOM Structured Report is asked for: this client takes the JSON path.
  const client = createClient<paths, "application/json">({
    baseUrl,
    headers: { Authorization: `Bearer ${apiKey}` },
  });
  const upload: GroundUpload = { image: [image], target };
  const { data, error } = await client.POST("/ground", { body: upload, bodySerializer: () => multipart(upload) });
  if (error) {
    throw new Error(`${error.error.code}: ${error.error.message}`);
  }
  if (data.findings.length === 0) {
    throw new Error("no findings");
  }
  return { label: data.findings[0].label, x_min: data.findings[0].box.x_min, box_convention: data.box_convention };
}
