import torch
torch.set_num_threads(1)
from hooked_llava.testing_onevision import tiny_pair
from hooked_llava.testing import random_images
model, hf = tiny_pair("onevision")
ims = random_images(5, 40, seed=2)
frames = random_images(3, 36, seed=5)
inputs = model.prepare(questions=["What is the color?", "Which shape?", "Describe the video", "the first"], images=[[ims[0]], [ims[1], ims[2]], [], []], videos=[None, None, frames, None])
print(repr(inputs.texts[2][:80]))
kw = dict(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values, image_sizes=torch.tensor(inputs.image_sizes), batch_num_images=torch.tensor(inputs.batch_num_images), pixel_values_videos=inputs.pixel_values_videos)
with torch.no_grad():
    ref = hf(**kw).logits
got = model(inputs)
m = inputs.attention_mask.bool()
print("video+multi", (got-ref)[m].abs().max().item())
print(inputs.image_map().groupby(["row","image","kind"]).size())
print(model.to_str_tokens(inputs.input_ids[3, inputs.positions("question")[3]]))
