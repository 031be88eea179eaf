/* Darknet's own reading of a cfg, layer by layer, for the parser tests.
   Usage: layers CFG  ->  one line per layer: "type out_c out_h out_w outputs"
   (type as the cfg spells the section; out_* are 0 where Darknet's layer outputs no image). */
#include <stdio.h>
#include "darknet.h"

static const char *name(LAYER_TYPE t)
{
    switch (t) {
        case CONVOLUTIONAL: return "convolutional";
        case MAXPOOL: return "maxpool";
        case LOCAL: return "local";
        case DROPOUT: return "dropout";
        case CONNECTED: return "connected";
        case AVGPOOL: return "avgpool";
        case SOFTMAX: return "softmax";
        case COST: return "cost";
        case DETECTION: return "detection";
        default: return "other";
    }
}

int main(int argc, char **argv)
{
    if (argc != 2) { fprintf(stderr, "usage: %s CFG\n", argv[0]); return 2; }
    network *net = parse_network_cfg(argv[1]);
    for (int i = 0; i < net->n; ++i) {
        layer l = net->layers[i];
        printf("%s %d %d %d %d\n", name(l.type), l.out_c, l.out_h, l.out_w, l.outputs);
    }
    return 0;
}
