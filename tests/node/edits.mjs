// Image edits through the official openai Node SDK, called as a user would call it.
// Usage: node edits.mjs <base url> <image.png> <mask.png>; prints one JSON object.
import fs from "node:fs";
import OpenAI, { toFile } from "openai";

const [baseURL, imagePath, maskPath] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0 });
const file = (path) => toFile(fs.createReadStream(path), "input.png", { type: "image/png" });
const common = { prompt: "a red fox", size: "128x96", seed: 5, num_inference_steps: 4 };

const single = await client.images.edit({
  ...common,
  image: await file(imagePath),
  response_format: "b64_json",
});
const list = await client.images.edit({
  ...common,
  image: [await file(imagePath)],
  response_format: "b64_json",
});
const masked = await client.images.edit({
  ...common,
  image: await file(imagePath),
  mask: await file(maskPath),
  response_format: "b64_json",
});
const events = [];
const stream = await client.images.edit({
  ...common,
  image: await file(imagePath),
  stream: true,
  partial_images: 2,
});
for await (const event of stream) {
  events.push({ type: event.type, index: event.partial_image_index ?? null });
}
let refused = null;
try {
  await client.images.edit({ ...common, image: [await file(imagePath), await file(imagePath)] });
} catch (error) {
  refused = { status: error.status, param: error.param ?? null };
}

console.log(
  JSON.stringify({
    single: single.data[0].b64_json,
    seed: single.data[0].seed,
    list: list.data[0].b64_json,
    masked: masked.data[0].b64_json,
    events,
    refused,
  }),
);
