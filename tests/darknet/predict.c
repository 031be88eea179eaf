/* Forward pass of Darknet itself, for the parity tests.
   Usage: predict CFG WEIGHTS IN.bin OUT.bin
   Loads the network (parse_network_cfg + load_weights), sets the batch to 1, reads
   net->inputs float32s (one image, channel-major as Darknet keeps it) from IN.bin, runs
   network_predict (net->train = 0: dropout is the identity, batch norm uses the rolling
   statistics) and writes the net->outputs float32s of the output layer to OUT.bin.
   Prints "inputs outputs". */
#include <stdio.h>
#include <stdlib.h>
#include "darknet.h"

int main(int argc, char **argv)
{
    if (argc != 5) { fprintf(stderr, "usage: %s CFG WEIGHTS IN.bin OUT.bin\n", argv[0]); return 2; }
    network *net = load_network(argv[1], argv[2], 0);
    set_batch_network(net, 1);
    float *input = calloc(net->inputs, sizeof(float));
    FILE *in = fopen(argv[3], "rb");
    if (!in || fread(input, sizeof(float), net->inputs, in) != (size_t)net->inputs) {
        fprintf(stderr, "cannot read %d floats from %s\n", net->inputs, argv[3]);
        return 1;
    }
    fclose(in);
    float *output = network_predict(net, input);
    FILE *out = fopen(argv[4], "wb");
    if (!out || fwrite(output, sizeof(float), net->outputs, out) != (size_t)net->outputs) {
        fprintf(stderr, "cannot write %s\n", argv[4]);
        return 1;
    }
    fclose(out);
    printf("%d %d\n", net->inputs, net->outputs);
    return 0;
}
