using System.Collections.Generic;

namespace Npcd
{
    /// <summary>One turn of a conversation: who said it and what. Npc: said by the conversation's own NPC (its
    /// replies), as NpcdClient.GetConversation reads it and AddTurn writes it; a line's History reads Speaker
    /// and Text only.</summary>
    public struct Turn
    {
        public string Speaker;
        public string Text;
        public bool Npc;

        public Turn(string speaker, string text, bool npc = false)
        {
            Speaker = speaker;
            Text = text;
            Npc = npc;
        }
    }

    /// <summary>An action valid right now. Only a Name: the persona's action of that name.
    /// With a Description or ArgsSchemaJson (a JSON Schema of an object): a new action, used
    /// as given.</summary>
    public struct ActionSpec
    {
        public string Name;
        public string Description;
        public string ArgsSchemaJson;

        public ActionSpec(string name, string description = null, string argsSchemaJson = null)
        {
            Name = name;
            Description = description;
            ArgsSchemaJson = argsSchemaJson;
        }
    }

    /// <summary>What an NPC is asked to answer. Unset (null) sampling values take the
    /// persona's defaults.</summary>
    public sealed class LineRequest
    {
        public string Persona;
        public string Line;
        public string Speaker;
        public string NpcId;
        /// <summary>Chosen by the client library when null.</summary>
        public string RequestId;
        public readonly List<Turn> History = new List<Turn>();
        public readonly Dictionary<string, string> Context = new Dictionary<string, string>();
        public Priority? Priority;
        public uint? DeadlineMs;
        public uint? MaxTokens;
        public float? Temperature;
        public float? TopP;
        public uint? TopK;
        public float? RepetitionPenalty;
        public ulong? Seed;
        public readonly List<string> Stop = new List<string>();

        /// <summary>Structured output: the reply is JSON {"say", "emotion", "action"} with
        /// the persona's emotions and actions. "say" streams as text; the line then raises
        /// EmotionChanged and ActionChosen, and the result carries Json, Action and Emotion.</summary>
        public bool Structured;
        /// <summary>The actions valid right now, instead of all of the persona's. Not empty:
        /// the line is structured.</summary>
        public readonly List<ActionSpec> Actions = new List<ActionSpec>();
        /// <summary>A JSON Schema (JSON text) the reply follows instead; its fields come back
        /// in LineResult.Json (a top-level string "say" streams as text). Implies structured.</summary>
        public string ResponseFormat;

        /// <summary>Sentence or Clause: the line raises SentenceReady for each complete sentence
        /// (or clause) as the text streams, for text-to-speech.</summary>
        public Segmentation Segmentation;
        /// <summary>The conversation this line belongs to (often the NpcId): the daemon keeps its
        /// turns and puts the earlier ones in the prompt instead of History (which then holds
        /// only lines said since), and appends this line and the reply when it finishes.</summary>
        public string Conversation;

        public LineRequest(string persona, string line)
        {
            Persona = persona;
            Line = line;
        }
    }
}
