// LoRAs through the official openai Node SDK: extra keys of the params object go into the
// JSON body, and the response's extra fields come back as they were sent.
// Usage: node loras.mjs <base url>; prints one JSON object.
import OpenAI from "openai";

const [baseURL] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0 });
const common = { prompt: "a red circle", num_inference_steps: 2, size: "64x64", seed: 5 };
const loras = [{ path: "a.safetensors", scale: 0.8 }];

const plain = await client.images.generate({ ...common, response_format: "b64_json", loras });
let completed = null;
const stream = await client.images.generate({ ...common, stream: true, loras });
for await (const event of stream) {
  if (event.type === "image_generation.completed") completed = event;
}
console.log(
  JSON.stringify({
    plain: plain.loras,
    streamed: completed.loras,
    same: plain.data[0].b64_json === completed.b64_json,
  }),
);
