// Mistakes the generated types must catch. The test compiles this file and expects tsc --strict to report
// errors on exactly the lines marked "error:", so types that decayed to `any` or `string` would fail it.
import createClient from "openapi-fetch";

import type { components, paths } from "./medmo.js";

type GroundUpload = components["schemas"]["GroundUpload"];
type GroundResponse = components["schemas"]["GroundResponse"];

export const base64InAnUpload: GroundUpload = { image: "iVBORw0KGgo=" }; // error: a multipart image is a file
export const noImage: GroundUpload = { target: "nodule" }; // error: the image is required
export const textCoordinate = (grounded: GroundResponse): string => grounded.findings[0].box.x_min; // error: a number
export const misspelt = (grounded: GroundResponse): number => grounded.findings[0].box.xmin; // error: no such field

const anyRepresentation = createClient<paths>({ baseUrl: "/" });
const json = createClient<paths, "application/json">({ baseUrl: "/" });

export const unknownRoute = () => json.POST("/grounding", {}); // error: no such route
export async function withoutAskingForJson(upload: GroundUpload): Promise<number> {
  const { data } = await anyRepresentation.POST("/ground", { body: upload });
  return data ? data.findings.length : 0; // error: unless JSON is asked for, a 200 may be a DICOM Blob
}
export async function askingForJson(upload: GroundUpload): Promise<number> {
  const { data } = await json.POST("/ground", { body: upload });
  return data ? data.findings.length : 0;
}
